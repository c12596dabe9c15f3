"""Moved to :mod:`compress.metrics.cost`; a temporary re-export for modules not yet switched."""

from compress.metrics.cost import (CostResult, bytes_on_disk, count_parameters, kv_cache_bytes_per_token,  # noqa: F401
                                   measure_cost, tokens_per_second)

__all__ = ["CostResult", "bytes_on_disk", "count_parameters", "kv_cache_bytes_per_token", "measure_cost",
           "tokens_per_second"]
