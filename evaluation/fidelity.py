"""Moved to :mod:`compress.metrics.fidelity`; a temporary re-export for modules not yet switched."""

from compress.metrics.fidelity import FidelityResult, fidelity  # noqa: F401

__all__ = ["FidelityResult", "fidelity"]
