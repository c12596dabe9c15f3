"""Writing outputs: safetensors weights, config, tokenizer and ``compress.json``.

Everything is written into a temporary folder beside the destination and renamed into place, so a
failed or interrupted save leaves nothing behind, and an existing output is replaced only with
``force``. The input model's folder is never written to.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Iterator

from compress.errors import CompressError

log = logging.getLogger(__name__)
RECORD_FILE = "compress.json"


def library_versions() -> dict[str, str]:
    out = {}
    for name in ("compress", "torch", "transformers", "safetensors", "compressed-tensors", "peft", "accelerate"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def check_output_path(out: str | os.PathLike, inputs: list[str | os.PathLike] = (), force: bool = False) -> Path:
    """Validate an output folder before any work is done (so bad paths fail fast)."""
    out = Path(out).expanduser().resolve()
    for source in inputs:
        if source is None:
            continue
        src = Path(source).expanduser()
        if not src.exists():
            continue
        src = src.resolve()
        if out == src or src in out.parents or out in src.parents:
            raise CompressError(f"output {out} would overwrite or sit inside the input {src}; choose another --out")
    if out.exists() and not force:
        raise CompressError(f"output {out} already exists; pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise CompressError(f"output {out} exists and is not a folder")
    if not out.parent.exists():
        raise CompressError(f"the parent folder of {out} does not exist")
    return out


@contextmanager
def atomic_output(out: str | os.PathLike, inputs: list = (), force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces ``out``, on failure it is removed."""
    out = check_output_path(out, inputs, force)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(tmp, out)
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


def save_model(model, tokenizer, out: str | os.PathLike, record: dict, *, source_path: str | os.PathLike | None = None,
               force: bool = False, extra_files: dict[str, str] | None = None) -> Path:
    """Save ``model`` (safetensors), its config, the tokenizer and compress.json to ``out`` atomically."""
    with atomic_output(out, [source_path], force) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        write_record(tmp, record)
    final = Path(out).expanduser().resolve()
    log.info("saved %s", final)
    return final
