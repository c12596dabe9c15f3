"""The exporter interface and its registry: output formats looked up by name, never by if/elif.

An exporter writes a model in one format (a plain Hugging Face checkpoint, compressed-tensors, the
GPTQ v1 layout, a peft adapter, …) and may read it back. A method names the exporter its result needs
(``Method.output_format``); :func:`choose_format` turns a requested format (or ``auto``) and the
stages into one exporter name before any calibration, so a format that cannot hold the result fails
fast. Each exporter has a ``kind`` — what it holds: ``float`` weights, ``quantized`` weights, an
``adapter``, ``hybrid`` layers — and two exporters of one kind can stand in for each other (a
GPTQ-quantized model may be written as compressed-tensors or as gptq).

Built-in exporters register on import (:data:`BUILTIN_MODULES`); other packages add theirs through
the ``compress.exporters`` entry-point group::

    [project.entry-points."compress.exporters"]
    myformat = "mypackage.export:MyExporter"

A folder's ``compress.json`` says which exporter wrote it (``"format"``);
:func:`compress.models.load_model` asks that exporter's :meth:`Exporter.load` first, so a format
with its own module classes reloads through the package.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, ClassVar, Iterable

import torch

from compress.errors import CompressError
from compress.registry import load_plugins

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "compress.exporters"
BUILTIN_MODULES = ["compress.exporters.safetensors", "compress.exporters.quantized", "compress.exporters.peft"]
AUTO = "auto"
KINDS = {"float": "float weights", "quantized": "quantized weights", "adapter": "a peft adapter",
         "hybrid": "hybrid layers"}
_REGISTRY: dict[str, type["Exporter"]] = {}
_loaded = False


class Exporter:
    """Base of every exporter. Subclasses set ``name``, ``kind``, ``help`` and define :meth:`write`
    (or override :meth:`save` entirely)."""

    name: ClassVar[str] = ""
    help: ClassVar[str] = ""
    kind: ClassVar[str] = "float"  # what the format holds: a key of KINDS (or a new kind)
    # ``auto`` picks, among the exporters that hold the model, the one of highest priority (0: never)
    auto_priority: ClassVar[int] = 0
    # options save() accepts (name → default); anything else is an error naming the allowed ones
    option_defaults: ClassVar[dict[str, Any]] = {}

    def holds(self, model: torch.nn.Module) -> bool:
        """Whether ``model``, as it is now, is what this format writes (its weights are of ``kind``)."""
        return False

    def check_plan(self, model: torch.nn.Module, methods: list, options: dict | None = None) -> None:
        """Checks that need no data, run before any calibration: the format can hold what ``methods``
        will make of ``model`` (shapes, settings). Raise CompressError naming the problem."""
        self.check_options(options)

    def check_model(self, model: torch.nn.Module) -> None:
        """Checks on the finished model, before anything is written."""
        if not self.holds(model):
            raise CompressError(f"export format '{self.name}' writes {KINDS.get(self.kind, self.kind)}, "
                                f"and the model does not hold them; use format {_alternatives(model)}")

    def options(self, methods: list) -> dict:
        """This format's save options as the stages configured them (e.g. GPTQ's act_order)."""
        return {}

    def check_options(self, options: dict | None) -> dict:
        """``options`` over the defaults; an unknown option is a CompressError."""
        options = dict(options or {})
        unknown = [k for k in options if k not in self.option_defaults]
        if unknown:
            allowed = ", ".join(self.option_defaults) or "none"
            raise CompressError(f"export format '{self.name}' has no option '{unknown[0]}' (options: {allowed})")
        return {**self.option_defaults, **options}

    def save(self, model: torch.nn.Module, tokenizer, out: str | os.PathLike, record: dict, *,
             source: str | os.PathLike | list | None = None, force: bool = False,
             extra_files: dict[str, str] | None = None, options: dict | None = None) -> Path:
        """Write ``out`` atomically (a temporary folder renamed into place): what :meth:`write` puts there,
        ``extra_files`` (name → text) and compress.json with ``record`` and ``"format": name``.
        ``source`` (the input model, or several names of it) is never overwritten."""
        from compress.export import atomic_output, write_record

        options = self.check_options(options)
        self.check_model(model)
        sources = list(source) if isinstance(source, (list, tuple)) else [source]
        with atomic_output(out, sources, force, need=self.output_bytes(model, options)) as tmp:
            self.write(model, tokenizer, tmp, options, record)
            for name, text in (extra_files or {}).items():
                (tmp / name).write_text(text)
            write_record(tmp, {**record, "format": self.name})
        final = Path(out).expanduser().resolve()
        log.info("saved %s (%s)", final, self.name)
        return final

    def output_bytes(self, model: torch.nn.Module, options: dict) -> int:
        """About how many bytes :meth:`write` puts on disk, checked against the free space before
        writing. Default: the model's tensor bytes."""
        from compress.export import tensor_bytes

        return tensor_bytes(model)

    def write(self, model: torch.nn.Module, tokenizer, folder: Path, options: dict, record: dict) -> None:
        """Write the model's files into ``folder`` (a fresh temporary folder)."""
        raise NotImplementedError(f"{type(self).__name__} must define write() or save()")

    def load(self, folder: Path, dtype: torch.dtype, device: str) -> torch.nn.Module | None:
        """Build the model saved in ``folder``; None lets transformers' AutoModelForCausalLM load it."""
        return None


@contextmanager
def described(model: torch.nn.Module):
    """Give ``model`` the config that describes its present widths and depth while it is saved
    (:func:`compress.arch.width_config`); yields the files to write beside it."""
    from compress.arch import width_config

    config, extra = width_config(model)
    original = model.config
    model.config = config
    try:
        yield extra
    finally:
        model.config = original


def register_exporter(cls: type[Exporter]) -> type[Exporter]:
    """Class decorator: make an exporter available by its ``name``."""
    if not (isinstance(cls, type) and issubclass(cls, Exporter)):
        raise TypeError(f"{cls!r} is not an Exporter subclass")
    if not cls.name:
        raise TypeError(f"{cls.__name__} has no name")
    if cls.name == AUTO:
        raise TypeError(f"'{AUTO}' is reserved for choose_format")
    _REGISTRY[cls.name] = cls
    return cls


def _load_plugins() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    load_plugins("exporter", BUILTIN_MODULES, entry_points(group=ENTRY_POINT_GROUP),
                 lambda obj: isinstance(obj, type) and issubclass(obj, Exporter) and bool(obj.name)
                 and obj.name not in _REGISTRY, register_exporter)


def exporter_names() -> list[str]:
    """Registered exporter names, sorted."""
    _load_plugins()
    return sorted(_REGISTRY)


def get_exporter(name: str) -> Exporter:
    """An instance of the exporter ``name``; unknown names are a CompressError listing the known ones."""
    names = exporter_names()
    if name not in _REGISTRY:
        raise CompressError(f"unknown export format '{name}' (available: {AUTO}, {', '.join(names)})")
    return _REGISTRY[name]()


def _of_kind(kind: str) -> list[str]:
    return [n for n in exporter_names() if _REGISTRY[n].kind == kind]


def detect_format(model: torch.nn.Module) -> str:
    """The exporter ``auto`` picks for ``model`` as it is now: the highest ``auto_priority`` among
    those that hold it."""
    holders = [(cls.auto_priority, n) for n in exporter_names() if (cls := _REGISTRY[n]).auto_priority > 0
               and cls().holds(model)]
    if not holders:
        raise CompressError(f"no export format holds a {type(model).__name__} (formats: {', '.join(exporter_names())})")
    return max(holders)[1]


def _alternatives(model: torch.nn.Module) -> str:
    try:
        kind = _REGISTRY[detect_format(model)].kind
    except CompressError:
        return AUTO
    return " or ".join(_of_kind(kind)) + f" (or {AUTO})"


def choose_format(requested: str | None, model: torch.nn.Module, methods: Iterable = ()) -> str:
    """The exporter name for a job: ``requested`` (``auto``/None or a name) checked against what the
    stages produce.

    What the result holds is the kind of the exporter named by the last method with an
    ``output_format`` (a later stage rewrites what earlier ones produced: prune then quantize gives
    quantized weights); with none, it is what the model holds now (float, or quantized when it has
    quantized Linears). ``auto`` is that method's exporter, or the model's (:func:`detect_format`).
    A named format must be of the same kind.
    """
    methods = list(methods)
    needs = [(m.name, m.output_format) for m in methods if getattr(m, "output_format", None)]
    for method, fmt in needs:
        if fmt not in exporter_names():
            raise CompressError(f"method {method} needs export format '{fmt}', which is not registered "
                                f"(available: {', '.join(exporter_names())})")
    if needs:
        method, fmt = needs[-1]
        produced, why = fmt, f"method {method} produces"
    else:
        produced = detect_format(model)
        why = "the stages leave" if methods else "the model holds"
    if requested in (None, AUTO):
        return produced
    exporter = get_exporter(requested)
    kind = _REGISTRY[produced].kind
    if exporter.kind != kind:
        what = KINDS.get(kind, kind)
        raise CompressError(f"export format '{requested}' writes {KINDS.get(exporter.kind, exporter.kind)}, but {why} "
                            f"{what}; use format {' or '.join(_of_kind(kind))} (or {AUTO})")
    return requested
