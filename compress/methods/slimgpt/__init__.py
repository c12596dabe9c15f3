"""SlimGPT structured pruning (Ling et al., NeurIPS 2024): see :mod:`.method`."""

from compress.methods.slimgpt.config import SlimGPTConfig  # noqa: F401
from compress.methods.slimgpt.method import SlimGPT  # noqa: F401
