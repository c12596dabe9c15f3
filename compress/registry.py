"""Loading the plugins of a registry (methods, exporters): the built-in modules, then the classes
that installed packages declare in an entry-point group."""

from __future__ import annotations

import importlib
import logging
from typing import Callable, Iterable

log = logging.getLogger(__name__)


def load_plugins(kind: str, builtin_modules: Iterable[str], found: Iterable, accept: Callable[[object], bool],
                 register: Callable[[type], object]) -> None:
    """Import ``builtin_modules`` (each registers itself on import), then load every entry point in
    ``found`` and ``register`` what ``accept`` takes. A broken third-party plugin is logged and
    skipped: it must not break the others."""
    for module in builtin_modules:
        importlib.import_module(module)
    for ep in found:
        try:
            obj = ep.load()
        except Exception as exc:
            log.warning("%s plugin %s could not be loaded: %s", kind, ep.name, exc)
            continue
        if accept(obj):
            register(obj)
