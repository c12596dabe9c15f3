"""Exporters: output formats registered by name (see :mod:`compress.exporters.base`).

Built-in: ``safetensors`` (a plain Hugging Face checkpoint; per-layer widths and dropped layers get
a ``compress_llama`` config and its modeling file), ``compressed-tensors`` and ``gptq`` (quantized
weights), ``peft`` (an adapter, or merged weights). A ``hybrid`` exporter (MLA/Mamba layers with
their own modeling file) fits the same interface: kind ``hybrid``, a ``write`` that saves the config
and modeling file, and a ``load`` that builds its module classes.
"""

from compress.exporters.base import (  # noqa: F401
    AUTO, ENTRY_POINT_GROUP, KINDS, Exporter, choose_format, described, detect_format, exporter_names, get_exporter,
    register_exporter,
)
from compress.exporters.base import BUILTIN_MODULES as _BUILTIN

_BUILTIN.append("compress.exporters.hybrid")  # Zebra-Llama hybrids (compress.hybrid), loaded with the others
