"""FLAP structured pruning (An et al., AAAI 2024): see :mod:`.method`."""

from compress.methods.flap.method import FLAP, FLAPConfig  # noqa: F401
