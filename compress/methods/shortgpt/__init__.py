"""ShortGPT depth pruning (Men et al., 2024): see :mod:`.method`."""

from compress.methods.shortgpt.method import ShortGPT, ShortGPTConfig  # noqa: F401
