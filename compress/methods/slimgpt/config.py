"""The typed configuration of SlimGPT pruning (validated; errors name the field)."""

from __future__ import annotations

from dataclasses import dataclass

from compress.errors import ConfigError
from compress.plugin import config_field


@dataclass
class SlimGPTConfig:
    ratio: float = config_field(0.2, "Fraction of the decoder layers' prunable parameters "
                                     "(q, k, v, o, gate, up, down) to remove, in (0, 1).")
    schedule: str = config_field("log", "Per-layer ratio: log (Incremental Pruning Ratio), linear, uniform, or "
                                        "global (allocated by the OBS errors of every layer's units, one threshold).")
    min_scale: float = config_field(0.25, "r_min = min_scale × ratio for the log/linear schedules, in [0, 1].")
    damping: float = config_field(0.01, "Hessian damping as a fraction of its mean diagonal.")
    gqa_unit: str = config_field("query", "Attention unit under grouped-query attention: 'query' removes the "
                                          "same number of query heads from every KV group, 'kv' removes "
                                          "whole KV groups (their query heads, keys and values).")
    ffn_first_cap: int = config_field(1024, "Dynamic Group Size: largest first batch of FFN channels.")
    ffn_batch: int = config_field(64, "Dynamic Group Size: batch of FFN channels after the first.")
    prune_attention: bool = config_field(True, "Prune attention heads (else only FFN channels).")
    obs_dtype: str = config_field("float64", "Precision of the OBS solves: float64 or float32.")
    bias: bool = config_field(False, "Bias compensation: OBS on the centred inputs, then a bias on o_proj / "
                                     "down_proj that keeps each output's mean on the calibration tokens.")
    ffn_multiple: int = config_field(1, "Keep a multiple of this many FFN channels per layer (e.g. the group "
                                        "size of a later quantization stage, which must divide down_proj's input).")

    def __post_init__(self):
        if not 0.0 < self.ratio < 1.0:
            raise ConfigError(f"field 'ratio' must be strictly between 0 and 1, got {self.ratio}")
        if self.schedule not in ("log", "linear", "uniform", "global"):
            raise ConfigError(f"field 'schedule' must be log, linear, uniform or global, got {self.schedule!r}")
        if not 0.0 <= self.min_scale <= 1.0:
            raise ConfigError(f"field 'min_scale' must be in [0, 1], got {self.min_scale}")
        if not 0.0 <= self.damping < 1.0:
            raise ConfigError(f"field 'damping' must be in [0, 1), got {self.damping}")
        if self.gqa_unit not in ("query", "kv"):
            raise ConfigError(f"field 'gqa_unit' must be 'query' or 'kv', got {self.gqa_unit!r}")
        if self.ffn_first_cap < 0 or self.ffn_batch <= 0:
            raise ConfigError("fields 'ffn_first_cap' must be ≥ 0 and 'ffn_batch' > 0")
        if self.ffn_multiple < 1:
            raise ConfigError(f"field 'ffn_multiple' must be a positive integer, got {self.ffn_multiple}")
        if self.obs_dtype not in ("float64", "float32"):
            raise ConfigError(f"field 'obs_dtype' must be float64 or float32, got {self.obs_dtype!r}")
