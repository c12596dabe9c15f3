"""The one progress-bar helper of the library (tqdm on stderr, silent when disabled)."""

from __future__ import annotations

import os
from typing import Iterable, Iterator, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")

_ENABLED = os.environ.get("COMPRESS_PROGRESS", "1") != "0"


def set_progress(enabled: bool) -> None:
    """Turn progress bars on or off for the whole process."""
    global _ENABLED
    _ENABLED = enabled


def progress(iterable: Iterable[T], desc: str, total: int | None = None, unit: str = "it") -> Iterator[T]:
    """Wrap ``iterable`` in a progress bar when progress is enabled."""
    if not _ENABLED:
        yield from iterable
        return
    yield from tqdm(iterable, desc=desc, total=total, unit=unit, leave=False, dynamic_ncols=True)


def bar(desc: str, total: int, unit: str = "it"):
    """A manual bar (``update``/``set_postfix``/``close``); a no-op object when disabled."""
    return tqdm(desc=desc, total=total, unit=unit, leave=False, dynamic_ncols=True, disable=not _ENABLED)
