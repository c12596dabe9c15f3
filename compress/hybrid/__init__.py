"""Zebra-Llama hybrids: Llama layers whose attention becomes MLA or Mamba2, initialised from it.

The self-contained files (``configuration_zebra_llama``, ``modeling_zebra_llama``, ``zebra_attention``,
``zebra_mamba2``, ``zebra_ssd``, ``zebra_cache``) import only torch, transformers and each other: the
hybrid exporter copies them beside a checkpoint. :mod:`compress.hybrid.build` makes a hybrid from a
loaded Llama (``hybridize``) and one layer's mixer from its attention.
"""

from compress.hybrid.configuration_zebra_llama import MIXERS, MODEL_TYPE, ZebraLlamaConfig  # noqa: F401
from compress.hybrid.modeling_zebra_llama import (  # noqa: F401
    ZebraLlamaForCausalLM, build_mixer, register_auto_classes,
)

# the files saved beside a hybrid checkpoint (relative imports between them only)
MODELING_FILES = ("configuration_zebra_llama.py", "modeling_zebra_llama.py", "zebra_attention.py",
                  "zebra_mamba2.py", "zebra_ssd.py", "zebra_cache.py")


def is_hybrid(model) -> bool:
    """Whether ``model`` is a Zebra-Llama hybrid (by its config's model type, so remote-code copies count)."""
    return getattr(getattr(model, "config", None), "model_type", None) == MODEL_TYPE


def hybridize(*args, **kwargs):
    """See :func:`compress.hybrid.build.hybridize`."""
    from compress.hybrid.build import hybridize as build

    return build(*args, **kwargs)
