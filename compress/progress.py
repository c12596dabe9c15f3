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


# compressed-tensors draws its own tqdm bars (nested, with cursor-up escapes) when it loads a quantized
# checkpoint and again on its first forward: "Applying quantization config", "Compressing model",
# "Dispatching model", "Decompressing model". They say nothing a user of compress needs: once a quantized
# model is loaded they are off for the rest of the process.
_THIRD_PARTY_BARS = ("compressed_tensors.compressors.model_compressors.model_compressor",
                     "compressed_tensors.quantization.lifecycle.apply", "compressed_tensors.offload.dispatch")


def silence_third_party_bars() -> None:
    import importlib

    from tqdm import tqdm as plain

    def silent(*args, **kwargs):
        kwargs["disable"] = True
        return plain(*args, **kwargs)

    for name in _THIRD_PARTY_BARS:
        try:
            module = importlib.import_module(name)
        except Exception:  # another compressed-tensors layout, or none installed: nothing to quiet
            continue
        if getattr(module, "tqdm", None) is plain:
            module.tqdm = silent
