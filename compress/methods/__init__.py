"""Compression methods as plugins: see :mod:`compress.plugin`."""

from compress.plugin import (  # noqa: F401
    Group, LayerMethod, Method, ModelMethod, available_methods, build_method, config_field, get_method,
    make_config, register,
)
