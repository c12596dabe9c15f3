"""Writing outputs: safetensors weights, config, tokenizer and ``compress.json``.

Everything is written into a temporary folder beside the destination (``.NAME.tmp-PID-XXXX``) and
renamed into place, so a failed or interrupted save leaves nothing behind, and an existing output is
replaced only with ``force``. The input model's folder is never written to: the output is compared
with every form of every input (the path the user gave, through symlinks; an alias's GGUF file and
the folder that holds it; the cached float folder a GGUF maps to; the GGUF a cached folder came from).

Two runs writing one destination exclude each other through an exclusive ``flock`` on
``.NAME.lock`` beside it, held from the check to the rename: without ``force`` the second one is an
error; with it, it waits and then replaces. Temporary folders left by dead processes are removed by
the next run to the same destination. Running out of disk space (or another OS error while writing)
is one :class:`CompressError` naming the path and the bytes needed, and a free-space check runs before
a large output is written.
"""

from __future__ import annotations

import datetime
import errno
import json
import logging
import os
import re
import shutil
import tempfile
import threading
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Iterable, Iterator

from compress.errors import CompressError

log = logging.getLogger(__name__)
RECORD_FILE = "compress.json"
# OS errors that writing an output can meet and the user can fix (space, quota, permissions, media)
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO,
                errno.ENAMETOOLONG}
_OS_ERROR_IN_TEXT = re.compile(r"\(os error (\d+)\)")  # how Rust writers (safetensors) report an errno


def library_versions() -> dict[str, str]:
    out = {}
    for name in ("compress", "torch", "transformers", "safetensors", "compressed-tensors", "peft", "accelerate"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


# ---------------------------------------------------------------- inputs: every path that names them

def input_paths(inputs: Iterable) -> list[Path]:
    """Every path that holds one of ``inputs`` (model specs, folders, files), resolved through symlinks:
    the path itself; for an alias its GGUF file and its cached float folder; for a GGUF file (or a
    folder whose only model is one) its cached float folder; for a cached folder the GGUF it came from.
    Nothing is loaded or converted; specs that name nothing are skipped."""
    from compress.models import ALIASES, alias_gguf

    found: list[Path] = []

    def add(path: Path | None) -> None:
        if path is None:
            return
        try:
            path = Path(path).expanduser().resolve()
        except (OSError, RuntimeError):
            return
        if path not in found:
            found.append(path)

    for spec in inputs:
        if spec is None or str(spec) == "":
            continue
        text = str(spec)
        if text in ALIASES:
            try:
                gguf = alias_gguf(text)
            except CompressError:
                gguf = None
            if gguf is not None:
                add(gguf)
                add(_gguf_cache_folder(gguf))
        path = Path(text).expanduser()
        if not (path.exists() or path.is_symlink()):
            continue
        add(path)
        if path.is_file() and path.suffix.lower() == ".gguf":
            add(_gguf_cache_folder(path))
        elif path.is_dir():
            source = path / "source.json"  # a cached float folder names the GGUF it was converted from
            if source.is_file():
                try:
                    gguf = json.loads(source.read_text()).get("gguf")
                except (OSError, ValueError, AttributeError):
                    gguf = None
                if isinstance(gguf, str) and gguf:
                    add(Path(gguf))
            if not (path / "config.json").is_file():
                ggufs = sorted(path.glob("*.gguf"))
                if len(ggufs) == 1:
                    add(ggufs[0])
                    add(_gguf_cache_folder(ggufs[0]))
    return found


def _gguf_cache_folder(gguf: Path) -> Path | None:
    """The folder :func:`compress.models.materialize_gguf` converts ``gguf`` into (existing or not)."""
    from compress.models import _gguf_key, cache_dir

    try:
        return cache_dir() / "models" / _gguf_key(Path(gguf))
    except OSError:
        return None


def overlap(a: Path, b: Path) -> bool:
    """Whether one of two resolved paths is the other or lies inside it."""
    return a == b or a in b.parents or b in a.parents


def check_separate(path: str | os.PathLike, inputs: Iterable, what: str, flag: str) -> Path:
    """``path`` (resolved) must neither be, contain nor lie inside any form of any input."""
    path = Path(path).expanduser().resolve()
    for src in input_paths(inputs):
        if overlap(path, src):
            raise CompressError(f"{what} {path} would overwrite or sit inside the input {src}; choose another {flag}")
    return path


def check_output_path(out: str | os.PathLike, inputs: Iterable = (), force: bool = False,
                      claim: bool = False, wait: bool | None = None) -> Path:
    """Validate an output folder before any work is done (so bad paths fail fast).

    ``out`` must not be, contain or lie inside any form of any input (:func:`input_paths`), and must
    not exist unless ``force``. With ``claim`` the destination's lock is taken for this thread (see
    :func:`claim_output`) before its existence is checked, and temporary folders that dead processes
    left beside it are removed."""
    out = check_separate(out, inputs, "output", "--out")
    if not out.parent.exists():
        raise CompressError(f"the parent folder of {out} does not exist")
    taken = claim_output(out, force, wait) if claim else False
    try:
        if out.exists() and not force:
            raise CompressError(f"output {out} already exists; pass --force to replace it")
        if out.exists() and not out.is_dir():
            raise CompressError(f"output {out} exists and is not a folder")
    except BaseException:
        if taken:
            release_output(out)
        raise
    return out


# ---------------------------------------------------------------- one writer per destination
# (compress/output_lock.py; re-exported here, where callers look for the output helpers)
from compress.output_lock import (  # noqa: E402,F401
    OutputBusy, claim_output, holds, lock_path, release_all, release_output, remove_stale_temporaries,
)


# ---------------------------------------------------------------- the atomic write

def default_folder_mode() -> int:
    """The mode a plain ``mkdir`` gives under this process's umask (0o755 under the usual 022)."""
    mask = None
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                mask = int(line.split()[1], 8)
                break
    except (OSError, ValueError):
        pass
    if mask is None:
        mask = os.umask(0o022)
        os.umask(mask)
    return 0o777 & ~mask


def folder_bytes(folder: Path) -> int:
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def _free_bytes(folder: Path) -> int | None:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def _errno_of(exc: BaseException) -> int | None:
    """The errno of an OS error, also when a library wrapped it (``... (os error 28)``)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno is not None:
            return exc.errno
        match = _OS_ERROR_IN_TEXT.search(str(exc))
        if match:
            return int(match.group(1))
        exc = exc.__cause__ or exc.__context__
    return None


def _write_error(exc: BaseException, out: Path, need: int | None, written: int = 0) -> CompressError:
    code = _errno_of(exc)
    reason = os.strerror(code) if code is not None else str(exc).splitlines()[0]
    where = out.parent if out.parent.exists() else out
    free = _free_bytes(where)
    need = max(need or 0, written)
    parts = [f"cannot write {out}: {reason}"]
    if code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        size = f"about {_human(need)} ({need} bytes) needed" if need else "more space needed"
        parts.append(f"{size}, {_human(free)} free on {where}" if free is not None else size)
    return CompressError("; ".join(parts) + "; nothing was written")


def _human(n: int | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def check_free_space(out: Path, need: int | None) -> None:
    """A CompressError if the file system of ``out`` has less than ``need`` bytes free."""
    if not need:
        return
    free = _free_bytes(out.parent)
    if free is not None and free < need:
        raise CompressError(f"not enough free space to write {out}: about {_human(need)} ({need} bytes) needed, "
                            f"{_human(free)} ({free} bytes) free on {out.parent}; nothing was written")


def is_write_error(exc: BaseException) -> bool:
    return _errno_of(exc) in WRITE_ERRNOS


@contextmanager
def atomic_output(out: str | os.PathLike, inputs: Iterable = (), force: bool = False,
                  need: int | None = None) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces ``out``, on failure it is removed.

    The destination's lock is held from the check to the rename (taken here unless this thread
    already holds it, e.g. from :func:`compress.pipeline.preflight`); ``need`` (bytes, an estimate of
    the output's size) is checked against the free space first. Disk-full and other OS write errors
    become one CompressError naming the path and the bytes needed."""
    out = Path(out).expanduser().resolve()
    taken = claim_output_checked(out, inputs, force)
    try:
        check_free_space(out, need)
        try:
            tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
        except OSError as exc:
            raise _write_error(exc, out, need) from None
        try:
            yield tmp
            os.chmod(tmp, default_folder_mode())
            _swap_into_place(tmp, out, force)
        except BaseException as exc:
            written = folder_bytes(tmp) if tmp.exists() else 0
            shutil.rmtree(tmp, ignore_errors=True)
            if not isinstance(exc, CompressError) and isinstance(exc, Exception) and is_write_error(exc):
                raise _write_error(exc, out, need, written) from None
            raise
    finally:
        if taken:
            release_output(out)


def claim_output_checked(out: Path, inputs: Iterable, force: bool) -> bool:
    """check_output_path with the lock taken; True if this call took it (and so must release it)."""
    held = holds(out)
    check_output_path(out, inputs, force, claim=True)
    return not held


def _swap_into_place(tmp: Path, out: Path, force: bool) -> None:
    """Rename ``tmp`` to ``out`` (lock held); an existing ``out`` (only with ``force``) is moved aside
    first and removed after, or put back if the rename fails."""
    if out.exists() and not force:  # written by something that does not take the lock
        raise CompressError(f"output {out} appeared while this run was working; pass --force to replace it")
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}-{threading.get_ident()}"
        os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        if old is not None and not out.exists():
            os.replace(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_record(folder: Path, record: dict) -> None:
    """Write compress.json: what was done, from what, with which versions, and what was measured."""
    full = {
        "compress_format": 1,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": library_versions(),
        **record,
    }
    (folder / RECORD_FILE).write_text(json.dumps(full, indent=2, default=_jsonable) + "\n")


def _jsonable(obj):
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "__dataclass_fields__"):
        import dataclasses

        return dataclasses.asdict(obj)
    return str(obj)


def tensor_bytes(model) -> int:
    """Bytes of ``model``'s tensors (parameters and buffers, each shared one once): an output's size."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def save_model(model, tokenizer, out: str | os.PathLike, record: dict, *, source_path: str | os.PathLike | None = None,
               force: bool = False, extra_files: dict[str, str] | None = None) -> Path:
    """Save ``model`` (safetensors), its config, the tokenizer and compress.json to ``out`` atomically."""
    with atomic_output(out, [source_path], force, need=tensor_bytes(model)) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        write_record(tmp, record)
    final = Path(out).expanduser().resolve()
    log.info("saved %s", final)
    return final
