"""What ``compress VERB --help`` shows of the registered methods, kept on disk between runs.

A verb's help lists one flag per Config field of every registered method, which means importing the
methods (and torch): seconds, for a help page. The flags' specs and texts are JSON, so the first help
of a verb stores them in ``$COMPRESS_CACHE/help.json`` (default ``~/.cache/compress``) under a key
made of the package's source files (path, size, mtime), the method and exporter entry points with their
distributions' versions, and the Python version; any change of these recomputes them. Only help pages
read the cache: a command that runs builds its flags from the registry itself.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Callable

PACKAGE = Path(__file__).resolve().parents[1]
GROUPS = ("compress.methods", "compress.exporters")
_fingerprint: str | None = None


def cache_file() -> Path:
    return Path(os.environ.get("COMPRESS_CACHE", Path.home() / ".cache" / "compress")) / "help.json"


def fingerprint() -> str:
    """A digest of everything the help of a verb depends on."""
    global _fingerprint
    if _fingerprint is None:
        digest = hashlib.sha256(sys.version.encode())
        for root, dirs, files in os.walk(PACKAGE):
            dirs[:] = sorted(d for d in dirs if d != "__pycache__")
            for name in sorted(files):
                if name.endswith(".py"):
                    stat = os.stat(os.path.join(root, name))
                    digest.update(f"{os.path.join(root, name)}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
        for group in GROUPS:
            for ep in sorted(entry_points(group=group), key=lambda e: e.name):
                dist = getattr(ep, "dist", None)
                version = f"{dist.name}=={dist.version}" if dist is not None else ""
                digest.update(f"{group}:{ep.name}={ep.value}:{version}\n".encode())
        _fingerprint = digest.hexdigest()
    return _fingerprint


def cached(key: str, compute: Callable[[], Any]) -> Any:
    """``compute()`` (a JSON value), from the cache when it was stored under the same fingerprint."""
    path = cache_file()
    try:
        stored = json.loads(path.read_text())
        if stored.get("fingerprint") == fingerprint() and key in stored.get("entries", {}):
            return stored["entries"][key]
    except (OSError, ValueError, AttributeError):
        stored = None
    value = compute()
    if not isinstance(stored, dict) or stored.get("fingerprint") != fingerprint():
        stored = {"fingerprint": fingerprint(), "entries": {}}
    stored["entries"][key] = value
    try:  # best effort: a read-only home only costs the next help its seconds
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(stored))
        tmp.replace(path)
    except OSError:
        pass
    return value
