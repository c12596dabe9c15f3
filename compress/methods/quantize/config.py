"""The typed configuration shared by the RTN and GPTQ methods."""

from __future__ import annotations

from dataclasses import dataclass

from compress.arch import SEQUENTIAL_GROUPS  # noqa: F401  (re-exported)
from compress.errors import ConfigError
from compress.plugin import config_field

SUPPORTED_BITS = (2, 3, 4, 8)
SUPPORTED_GROUP_SIZES = "-1 (per output channel) or a positive size such as 32, 64, 128"
# SEQUENTIAL_GROUPS (compress.arch): the Linear modules of a LLaMA decoder layer in GPTQ's sequential
# order (q/k/v see the same input, then o, then gate/up, then down): each later group is observed with
# the earlier ones quantized.


@dataclass
class QuantizeConfig:
    """Weight-only integer quantization of the decoder layers' Linear modules."""

    bits: int = config_field(4, "weight bit width: 2, 3, 4 or 8")
    group_size: int | None = config_field(None, "input columns sharing one scale/zero; -1 = one per output "
                                                "channel; unset (auto): 128 where it divides every quantized "
                                                "input width, else the largest of 64 and 32 that does, else -1")
    sym: bool = config_field(True, "symmetric grid (zero point fixed at the middle) instead of min/max")
    ignore: list[str] = config_field(["lm_head"], "module name patterns (fnmatch, or 're:REGEX') left in float")
    clip_search: bool = config_field(True, "search a shrink of each group's range that minimizes the "
                                           "rounding error (MSE-optimal clipping) instead of plain min/max")
    clip_grid: int = config_field(20, "number of shrink factors tried by the clipping search")
    clip_min: float = config_field(0.75, "smallest shrink factor tried by the clipping search")
    clip_norm: float = config_field(2.4, "exponent p of the |w - q(w)|^p error the clipping search minimizes")

    def __post_init__(self):
        if self.bits not in SUPPORTED_BITS:
            raise ConfigError(f"field 'bits' must be one of {', '.join(map(str, SUPPORTED_BITS))}, got {self.bits}")
        if self.group_size is not None and (self.group_size == 0 or self.group_size < -1):
            raise ConfigError(f"field 'group_size' must be {SUPPORTED_GROUP_SIZES}, got {self.group_size}")
        if self.clip_grid < 1:
            raise ConfigError(f"field 'clip_grid' must be at least 1, got {self.clip_grid}")
        if not 0.0 < self.clip_min <= 1.0:
            raise ConfigError(f"field 'clip_min' must be in (0, 1], got {self.clip_min}")
        if self.clip_norm <= 0:
            raise ConfigError(f"field 'clip_norm' must be positive, got {self.clip_norm}")


@dataclass
class RTNConfig(QuantizeConfig):
    """Round-to-nearest: each weight to its nearest grid point, no calibration data needed."""


@dataclass
class GPTQConfig(QuantizeConfig):
    """GPTQ (Frantar et al. 2023): quantize column by column, spreading each column's error onto the
    columns not yet quantized through the inverse Hessian of the layer's inputs."""

    act_order: bool = config_field(False, "quantize columns in order of decreasing Hessian diagonal (desc_act); "
                                          "groups stay static (fixed by the original column index)")
    static_groups: bool = config_field(True, "fit every group's grid on the original weights before any update "
                                              "(always so with act_order); false: fit a group when its first "
                                              "column is reached, on the updated weights, as the reference code")
    block_size: int = config_field(128, "columns per lazy batch update (GPTQ's block size B)")
    damp: float = config_field(0.01, "dampening added to the Hessian diagonal, as a fraction of its mean")
    damp_retries: int = config_field(6, "on a failed Cholesky, retry this many times with 10x the dampening")
    sequential: bool = config_field(True, "quantize q/k/v, then o, then gate/up, then down, each observed on "
                                          "the already quantized inputs; false: observe all at once (faster)")

    def __post_init__(self):
        super().__post_init__()
        if self.block_size < 1:
            raise ConfigError(f"field 'block_size' must be positive, got {self.block_size}")
        if not 0.0 < self.damp < 1.0:
            raise ConfigError(f"field 'damp' must be in (0, 1), got {self.damp}")
        if self.damp_retries < 0:
            raise ConfigError(f"field 'damp_retries' must be 0 or more, got {self.damp_retries}")
