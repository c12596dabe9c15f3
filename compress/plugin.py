"""The method plugin interface and its registry.

A method is a class with a ``name``, a typed ``Config`` dataclass (:mod:`compress.config`) and either
layer hooks (:class:`LayerMethod`, driven by the layer walk) or a whole-model ``run``
(:class:`ModelMethod`, given a :class:`RunContext`). Methods register with :func:`register`;
third-party packages add theirs through the ``compress.methods`` entry-point group, so the CLI,
recipes and the Python API look methods up by name and never branch on them. Methods never import
the walk: everything a method needs from it arrives in a :class:`LayerContext`.

What a layer method may ask of the walk (class attributes):

* per :class:`Group`, ``stats``: Σxᵀx and norms (``"hessian"``), norms only (``"norm"``) or nothing
  (``"none"``) of the group's module inputs;
* ``needs_inputs``: the layer's cached inputs (hidden states and each batch's call kwargs);
* ``needs_teacher``: the original layer's outputs on those inputs (layer-wise distillation targets);
* ``teacher_forced``: the next layer's inputs are the original layer's outputs, not the changed ones.

``apply`` may change weights in place, drop units, or return an :class:`Applied` whose ``replace``
maps module names inside the layer (``""`` for the whole layer) to new modules, which the walk
installs before it propagates. On resume the walk asks the method to ``rebuild`` each replaced
module from its record, then loads the saved tensors into it; a method that keeps more on modules
than parameters and buffers (a quantization grid, an attribute derived from shapes) returns those
tensors from ``layer_state`` (saved with the layer) and puts everything back in ``restore``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, ClassVar

import torch

from compress.config import config_field, make_config  # noqa: F401  (part of the plugin API)
from compress.errors import ConfigError
from compress.registry import load_plugins

ENTRY_POINT_GROUP = "compress.methods"
# built-in method modules, each registers itself on import
BUILTIN_MODULES: list[str] = ["compress.methods.quantize", "compress.methods.slimgpt", "compress.methods.flap",
                              "compress.methods.shortgpt", "compress.methods.bone", "compress.methods.transfer.method",
                       "compress.search.method", "compress.distill.method"]
_REGISTRY: dict[str, type["Method"]] = {}
_loaded = False


@dataclass
class Group:
    """Modules of one decoder layer that a method compresses together after observing their inputs.

    ``modules`` are names inside the layer (``"self_attn.o_proj"``); ``stats`` says what the walk
    collects on their inputs: ``"hessian"`` (Σxᵀx and norms), ``"norm"`` (norms only) or ``"none"``.
    """

    modules: list[str]
    stats: str = "hessian"
    name: str = ""


@dataclass
class LayerContext:
    """What the walk hands to :meth:`LayerMethod.apply` for one group of one decoder layer."""

    layer: torch.nn.Module  # on ``device``
    index: int
    group: Group
    stats: dict  # module name → HessianAccumulator (read-only; q/k/v and gate/up may share one)
    device: torch.device
    inputs: list[torch.Tensor] | None = None  # per batch (b, L, H) on the host, when ``needs_inputs``
    kwargs: list[dict] | None = None  # per batch: this layer's own call kwargs (host tensors)
    teacher_outputs: list[torch.Tensor] | None = None  # per batch, the original layer's outputs (``needs_teacher``)

    def batches(self):
        """(hidden, kwargs, teacher output or None) per batch, moved to the device."""
        from compress.devices import to_device

        teacher = self.teacher_outputs or [None] * len(self.inputs)
        for hidden, kwargs, target in zip(self.inputs, self.kwargs, teacher):
            yield (hidden.to(self.device), to_device(kwargs, self.device),
                   None if target is None else target.to(self.device))


@dataclass
class Applied:
    """What ``apply`` may return: a JSON-able record and modules to install in the layer."""

    record: dict = field(default_factory=dict)
    replace: dict[str, torch.nn.Module] = field(default_factory=dict)  # "" replaces the whole layer


@dataclass
class RunContext:
    """What a whole-model method receives: everything the pipeline has loaded or decided."""

    model: torch.nn.Module
    tokenizer: Any = None
    device: torch.device = torch.device("cpu")
    source: str | None = None  # what the user named: alias, folder or GGUF file
    calibration: torch.Tensor | None = None  # (N, L) tokens when the job has calibration data
    eval_data: str | None = None
    seed: int = 0
    out: Path | None = None
    extras: dict = field(default_factory=dict)  # what a verb adds for its method (training examples, ...)


class Method:
    """Base of every method. Subclasses set ``name``, ``Config`` and ``help``."""

    name: ClassVar[str] = ""
    help: ClassVar[str] = ""
    Config: ClassVar[type] = None
    # the CLI verb whose flags include this method's Config fields (``compress prune --method X``)
    verb: ClassVar[str | None] = None
    # the exporter this method's result needs (None: the plain/per-layer safetensors one)
    output_format: ClassVar[str | None] = None

    def __init__(self, config: Any = None):
        self.config = config if config is not None else self.Config()

    def describe_layers(self, model: torch.nn.Module) -> list[dict] | None:
        """After the work: one small dict per decoder layer for the closing table and compress.json
        (e.g. a pruning method's ratio and widths); None when the method has nothing per layer."""
        return None

    def summary(self) -> dict:
        """After the work: a small JSON-able dict of what the method decided for the whole model (e.g.
        the layers a depth pruning removed), for compress.json and the closing table. Default: none."""
        return {}

    def input_paths(self) -> list[str]:
        """Models or files this method reads besides the job's model (from its config: e.g. the source
        checkpoints of a transfer), as given (folders, GGUF files, aliases). The pipeline refuses an
        output that would overwrite or sit inside any of them, before any work. Default: none."""
        return []


class LayerMethod(Method):
    """A method applied layer by layer inside the walk."""

    needs_data: ClassVar[bool] = True  # False: data-free (RTN); the walk then runs on a few dummy tokens
    needs_inputs: ClassVar[bool] = False
    needs_teacher: ClassVar[bool] = False
    teacher_forced: ClassVar[bool] = False
    # True when ``apply`` changes nothing but the weights of the group it is given, in place, except that
    # it may drop input columns of the group's modules (and the producers' matching outputs) when it
    # reports them through ``kept_inputs``: the walk may then observe the groups with a staged forward
    # (compress.staged) that runs each part of the layer once, instead of re-running the layer from its
    # start for every group.
    stageable: ClassVar[bool] = False

    def kept_inputs(self) -> dict[str, torch.Tensor] | None:
        """After ``apply``: for each module of the group whose input columns were cut, the indices of
        the kept ones (ascending), so that a staged forward can cut its cached inputs alike. Read once."""
        return None

    def prepare(self, model: torch.nn.Module) -> Any:
        """Called once with the whole model before the walk (e.g. to plan every layer); fails fast."""

    def prepass(self) -> "LayerMethod | None":
        """A method that must see every layer before it changes any (a global allocation across layers)
        returns a read-only layer method here: the pipeline walks it over the unchanged model first, on
        the same calibration tokens, and its ``finish(model)`` hands what it learnt to this method
        (e.g. the per-layer plans). A resumed walk runs the prepass again. Default: none."""
        return None

    def groups(self, layer: torch.nn.Module, index: int) -> list[Group]:
        """The groups to observe and apply in order for decoder layer ``index``."""
        raise NotImplementedError(f"{type(self).__name__} must define groups()")

    def apply(self, ctx: LayerContext) -> Applied | dict | None:
        """Compress ``ctx.group`` of ``ctx.layer``; return a record for compress.json, or an Applied."""
        raise NotImplementedError(f"{type(self).__name__} must define apply()")

    def rebuild(self, layer: torch.nn.Module, index: int, name: str, record: dict) -> torch.nn.Module:
        """On resume: a module of the right class and shapes for ``name`` (replaced by ``apply`` in
        layer ``index``, whose record is given); the walk then loads the saved tensors into it."""
        raise NotImplementedError(f"{type(self).__name__} replaced module '{name}' but cannot rebuild it")

    def layer_state(self, layer: torch.nn.Module, index: int) -> dict[str, torch.Tensor]:
        """After decoder layer ``index`` is finished (every method applied, outputs propagated): the
        tensors the method keeps on the layer's modules outside their parameters and buffers (e.g. a
        quantization grid), by names of the method's choosing. A resumable walk saves them with the
        layer (safetensors) and hands them back to :meth:`restore`. Default: none."""
        return {}

    def restore(self, layer: torch.nn.Module, index: int, record: dict, state: dict[str, torch.Tensor]) -> None:
        """On resume, after finished layer ``index``'s parameters and buffers are loaded: put back what
        the method keeps on its modules besides them: attributes derived from shapes (recomputed from
        the loaded modules) and the tensors :meth:`layer_state` gave for this layer (``state``; empty
        when it gave none). ``record`` is the layer's record. Raise CompressError when ``state`` lacks
        what the method needs. Default: nothing."""

    def finish(self, model: torch.nn.Module) -> None:
        """Called once after the last layer (e.g. to update the config after pruning)."""


class ModelMethod(Method):
    """A method that works on the whole model at once (training, search, arithmetic)."""

    # keys of ``RunContext.extras`` the method cannot run without (a verb of its own supplies them;
    # a recipe stage of such a method is refused before any work)
    requires: ClassVar[tuple[str, ...]] = ()

    def run(self, ctx: RunContext) -> dict:
        """Do the work on ``ctx.model``; return a JSON-able record. A method that builds a new model
        returns it under ``"model"``."""
        raise NotImplementedError(f"{type(self).__name__} must define run()")


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method available by its ``name``."""
    if not cls.name:
        raise TypeError(f"{cls.__name__} has no name")
    if cls.Config is None or not dataclasses.is_dataclass(cls.Config):
        raise TypeError(f"{cls.__name__}.Config must be a dataclass")
    _REGISTRY[cls.name] = cls
    return cls


def _load_plugins() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    load_plugins("method", BUILTIN_MODULES, entry_points(group=ENTRY_POINT_GROUP),
                 lambda obj: isinstance(obj, type) and issubclass(obj, Method) and obj.name not in _REGISTRY, register)


def available_methods(verb: str | None = None) -> dict[str, type[Method]]:
    """Registered methods by name (only those of ``verb`` when given)."""
    _load_plugins()
    return {n: c for n, c in sorted(_REGISTRY.items()) if verb is None or c.verb == verb}


def get_method(name: str, verb: str | None = None) -> type[Method]:
    methods = available_methods()
    if name not in methods:
        raise ConfigError(f"unknown method '{name}' (available: {', '.join(methods) or 'none'})")
    if verb is not None and methods[name].verb != verb:
        choices = ", ".join(available_methods(verb)) or "none"
        raise ConfigError(f"method '{name}' is not a {verb} method (available: {choices})")
    return methods[name]


def build_method(name: str, options: dict | None = None, verb: str | None = None) -> Method:
    """Instantiate a registered method with a validated config built from ``options``."""
    cls = get_method(name, verb)
    return cls(make_config(cls.Config, options or {}, where=f"method {name}"))
