"""Typed method options: dataclass fields that carry their help text, built from plain mappings.

A method's ``Config`` is a dataclass whose fields are made with :func:`config_field`; recipes,
the CLI and the Python API build it through :func:`make_config`, which checks names and types and
names the field in every error (``method gptq: field 'bits' must be an integer, got 'four'``).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import field
from typing import Any

from compress.errors import ConfigError


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
    if origin in (typing.Union, types.UnionType):
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
