"""What the study notebooks share: the parameters check, the results folder, figures and tables.

Every notebook here opens with a parameters cell (papermill's ``parameters`` tag) of annotated
assignments, ``bits: list[int] = [2, 3, 4, 8]``, and calls :func:`check_parameters` in the next cell,
so a value of the wrong type (injected by papermill or edited by hand) stops the notebook with one
clear :class:`compress.errors.CompressError` before any work. ``notebooks/run.py`` checks the same
before it starts a kernel.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import types
import typing
from pathlib import Path

from compress.errors import CompressError

# the names an annotation of the parameters cell may use (``list[int] | None`` and the like)
ANNOTATION_NAMES = {"int": int, "float": float, "str": str, "bool": bool, "list": list, "dict": dict, "None": None}


def matches(value, hint) -> bool:
    """Whether ``value`` is of the annotated type ``hint``: int, float (an int is accepted), str, bool,
    None, ``list[X]``, ``dict[K, V]`` and unions of them. A bool is not an int."""
    if hint is None or hint is type(None):
        return value is None
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(matches(value, a) for a in args)
    if origin is list:
        return isinstance(value, list) and all(matches(v, args[0]) for v in value) if args else isinstance(value, list)
    if origin is dict:
        return isinstance(value, dict) and (not args or all(matches(k, args[0]) and matches(v, args[1])
                                                            for k, v in value.items()))
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, hint)


def type_name(hint) -> str:
    if hint is None or hint is type(None):
        return "None"
    return hint.__name__ if isinstance(hint, type) and not typing.get_args(hint) else str(hint).replace("typing.", "")


def check_parameters(namespace: dict, annotations: dict, notebook: str = "notebook") -> dict:
    """Check every annotated parameter in ``namespace`` against its annotation; return them as a dict
    (for the results file). A wrong type is a CompressError naming the parameter, its type and the value."""
    values = {}
    for name, hint in annotations.items():
        if name not in namespace:
            continue
        value = namespace[name]
        if not matches(value, hint):
            raise CompressError(f"{notebook}: parameter '{name}' must be {type_name(hint)}, got "
                                f"{type(value).__name__} {value!r}")
        values[name] = value
    return values


def folder(path: str | Path) -> Path:
    """The results folder (created)."""
    out = Path(path).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    return out


def work_folder(path: str | None) -> Path:
    """Where the notebook writes model folders: ``path`` (created, kept), or a new temporary folder that
    :func:`remove_work_folder` removes at the end."""
    return folder(path) if path else Path(tempfile.mkdtemp(prefix="compress-notebook-"))


def remove_work_folder(work: Path, path: str | None) -> None:
    """Remove the work folder if it is the temporary one (``path`` None); a folder the user named stays."""
    if not path:
        shutil.rmtree(work, ignore_errors=True)


def save_figure(fig, out_dir: str | Path, name: str) -> Path:
    """Save ``fig`` as ``out_dir/name.png``; return the path."""
    path = folder(out_dir) / f"{name}.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def write_results(out_dir: str | Path, name: str, results: dict) -> Path:
    """The numbers behind the figures, as ``out_dir/name.json`` (non-finite floats as null)."""
    path = folder(out_dir) / f"{name}.json"
    path.write_text(json.dumps(_finite(results), indent=1) + "\n")
    return path


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def table(rows: list[dict], columns: list[str] | None = None) -> str:
    """A plain-text table of ``rows`` (dicts), floats to 4 significant digits."""
    columns = columns or list(dict.fromkeys(k for r in rows for k in r))

    def cell(v):
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1e6 else f"{v:.3e}"
        return "-" if v is None else str(v)

    cells = [columns] + [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
