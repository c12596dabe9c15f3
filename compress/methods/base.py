"""The method plugin interface and its registry.

A method is a class with a ``name``, a typed ``Config`` dataclass and either layer-wise hooks
(:class:`LayerMethod`: ``groups`` then ``apply`` for every decoder layer, driven by the walk) or a
whole-model ``run`` (:class:`ModelMethod`). Methods register with :func:`register`; third-party
packages add theirs through the ``compress.methods`` entry-point group, so the CLI and recipes look
methods up by name and never branch on them.
"""

from __future__ import annotations

import dataclasses
import logging
import typing
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, ClassVar

import torch

from compress.errors import ConfigError

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "compress.methods"
BUILTIN_MODULES: list[str] = ["compress.methods.quantize", "compress.methods.slimgpt", "compress.methods.bone",
                              "compress.transfer.method"]  # built-in method modules, each registers itself on import
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


class Method:
    """Base of every method. Subclasses set ``name``, ``Config`` and ``help``."""

    name: ClassVar[str] = ""
    help: ClassVar[str] = ""
    Config: ClassVar[type] = None

    def __init__(self, config: Any = None):
        self.config = config if config is not None else self.Config()


class LayerMethod(Method):
    """A method applied layer by layer inside the walk."""

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

    def groups(self, layer: torch.nn.Module, index: int) -> list[Group]:
        """The groups to observe and apply in order for decoder layer ``index``."""
        raise NotImplementedError(f"{type(self).__name__} must define groups()")

    def apply(self, layer: torch.nn.Module, index: int, group: Group, stats: dict) -> dict:
        """Compress ``group`` of ``layer`` in place using ``stats`` (name → HessianAccumulator).

        Returns a small JSON-able record for compress.json (errors, what was kept, ...).
        """
        raise NotImplementedError(f"{type(self).__name__} must define apply()")

    def finish(self, model: torch.nn.Module) -> None:
        """Called once after the last layer (e.g. to update the config after pruning)."""


class ModelMethod(Method):
    """A method that works on the whole model at once (training, search, arithmetic)."""

    def run(self, model: torch.nn.Module, **context) -> dict:
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
    import importlib

    for module in BUILTIN_MODULES:
        importlib.import_module(module)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
        except Exception as exc:  # a broken third-party plugin must not break the others
            log.warning("method plugin %s could not be loaded: %s", ep.name, exc)
            continue
        if isinstance(obj, type) and issubclass(obj, Method) and obj.name not in _REGISTRY:
            register(obj)


def available_methods() -> dict[str, type[Method]]:
    _load_plugins()
    return dict(sorted(_REGISTRY.items()))


def get_method(name: str) -> type[Method]:
    methods = available_methods()
    if name not in methods:
        raise ConfigError(f"unknown method '{name}' (available: {', '.join(methods) or 'none'})")
    return methods[name]


def build_method(name: str, options: dict | None = None) -> Method:
    """Instantiate a registered method with a validated config built from ``options``."""
    cls = get_method(name)
    return cls(make_config(cls.Config, options or {}, where=f"method {name}"))


def config_field(default: Any, help: str, **kwargs) -> Any:
    """A dataclass field that carries its help text (shown by the CLI and in errors)."""
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help}, **kwargs)
    return field(default=default, metadata={"help": help}, **kwargs)


def make_config(config_cls: type, options: dict, where: str = "config") -> Any:
    """Build a config dataclass from a plain dict, checking names and types.

    Errors name the field: ``method gptq: field 'bits' must be an integer, got 'four'``. The
    dataclass's ``__post_init__`` may raise ConfigError for value checks.
    """
    if not isinstance(options, dict):
        raise ConfigError(f"{where}: options must be a mapping, got {type(options).__name__}")
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(options) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown field '{unknown[0]}' (fields: {', '.join(fields)})")
    hints = typing.get_type_hints(config_cls)
    values = {name: _coerce(value, hints[name], f"{where}: field '{name}'") for name, value in options.items()}
    try:
        return config_cls(**values)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _coerce(value: Any, hint: Any, what: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, what)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{what} has an invalid value {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{what} must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{what} must be a list, got {value!r}")
        inner = args[0] if args else Any
        return [_coerce(v, inner, what) for v in value]
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{what} must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{what} must be an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{what} must be a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{what} must be a string, got {value!r}")
    return value
