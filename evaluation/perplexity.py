"""Moved to :mod:`compress.metrics.perplexity`; a temporary re-export for modules not yet switched."""

from compress.metrics.perplexity import PerplexityResult, perplexity, window_losses, window_starts  # noqa: F401

__all__ = ["PerplexityResult", "perplexity", "window_losses", "window_starts"]
