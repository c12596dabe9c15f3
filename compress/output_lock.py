"""One writer per output destination: an exclusive ``flock`` on ``.NAME.lock`` beside it, held from
the output checks to the final rename, and the tidying of what dead runs left there.

Without ``force`` a second run to the same destination is an error; with it, it waits and then
replaces. Temporary folders of dead processes (``.NAME.tmp-PID-*``) are removed by the next run to the
same destination, and an output a dead run was replacing (``.NAME.old-PID``) is put back.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import shutil
import threading
from pathlib import Path

from compress.errors import CompressError

log = logging.getLogger(__name__)


class OutputBusy(CompressError):
    """Another run (process or thread) holds the destination's lock."""


_claims: dict[tuple[str, int], int] = {}  # (destination, thread id) → fd of its lock file
_claims_lock = threading.Lock()


def lock_path(out: Path) -> Path:
    return out.parent / f".{out.name}.lock"


def claim_output(out: str | os.PathLike, force: bool = False, wait: bool | None = None) -> bool:
    """Take the exclusive lock of destination ``out`` for this thread (re-entrant); True if taken now.

    If another run (process or thread) holds it: without ``force`` a CompressError; with ``force``
    wait for it (``wait`` overrides). Stale temporary folders of dead processes are removed once the
    lock is held."""
    out = Path(out).expanduser().resolve()
    key = (str(out), threading.get_ident())
    with _claims_lock:
        if key in _claims:
            return False
    wait = force if wait is None else wait
    path = lock_path(out)
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            from compress.export import _write_error

            raise _write_error(exc, out, None) from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not wait:
                    raise OutputBusy(f"another compress run is writing {out} now; wait for it to finish, "
                                        "or choose another --out") from None
                log.warning("another compress run is writing %s; waiting for it (--force)", out)
                fcntl.flock(fd, fcntl.LOCK_EX)
            # the holder before us may have removed the lock file as it let go: lock the file in place
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
        except BaseException:
            os.close(fd)
            raise
        if same:
            break
        os.close(fd)
    with _claims_lock:
        _claims[key] = fd
    try:
        remove_stale_temporaries(out)
    except OSError as exc:  # tidying is best effort; it must not fail the run
        log.warning("could not tidy up beside %s: %s", out, exc)
    return True


def holds(out: Path) -> bool:
    """Whether this thread holds the lock of ``out`` (resolved)."""
    with _claims_lock:
        return (str(out), threading.get_ident()) in _claims


def release_output(out: str | os.PathLike) -> None:
    """Let go of this thread's lock on ``out`` (nothing if it holds none); the lock file goes too."""
    out = Path(out).expanduser().resolve()
    with _claims_lock:
        fd = _claims.pop((str(out), threading.get_ident()), None)
    if fd is None:
        return
    try:
        try:
            if os.stat(lock_path(out)).st_ino == os.fstat(fd).st_ino:
                os.unlink(lock_path(out))  # while still holding it: a waiter re-checks the inode
        except OSError:
            pass
    finally:
        os.close(fd)


def release_all() -> None:
    """Let go of every lock this thread holds (the CLI calls it when a command ends)."""
    me = threading.get_ident()
    with _claims_lock:
        held = [Path(k[0]) for k in _claims if k[1] == me]
    for out in held:
        release_output(out)


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return True
    return True


def remove_stale_temporaries(out: Path) -> list[Path]:
    """Remove ``.NAME.tmp-PID-*`` folders beside ``out`` whose process is gone; a ``.NAME.old-PID``
    folder of a dead process (an earlier output it was replacing) is put back when ``out`` is missing,
    else removed. Call with the destination's lock held. Returns what was removed."""
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.(tmp|old)-(\d+)(-.*)?$")
    removed = []
    try:
        entries = list(out.parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = pattern.match(entry.name)
        if not match or entry.is_symlink() or not entry.is_dir():
            continue
        pid = int(match.group(2))
        if _pid_alive(pid) and pid != os.getpid():
            continue
        if pid == os.getpid() and match.group(1) == "tmp":
            continue  # this process's own, possibly in use by another thread
        if match.group(1) == "old" and not out.exists():
            log.warning("restoring %s from %s, left by a run that died while replacing it", out, entry.name)
            os.replace(entry, out)
            continue
        log.info("removing %s, left by a run (pid %d) that is gone", entry, pid)
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
    return removed
