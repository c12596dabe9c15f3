"""Compatibility names: the plugin interface lives in :mod:`compress.plugin`, typed options in
:mod:`compress.config`."""

from compress.config import config_field, make_config  # noqa: F401
from compress.plugin import (  # noqa: F401
    BUILTIN_MODULES, ENTRY_POINT_GROUP, Applied, Group, LayerContext, LayerMethod, Method, ModelMethod, RunContext,
    available_methods, build_method, get_method, register,
)
