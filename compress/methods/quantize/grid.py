"""The integer grid of weight-only quantization: fitting scales and zero points, rounding to the grid.

Codes are unsigned, ``q ∈ [0, 2^b − 1]``, and a weight is represented as ``ŵ = (q − z) · s`` with one
scale ``s`` and integer zero point ``z`` per (output row, group of ``group_size`` input columns).
Symmetric grids fix ``z = 2^(b−1)`` (the signed range [−2^(b−1), 2^(b−1) − 1] that compressed-tensors
stores); asymmetric grids span [min(w, 0), max(w, 0)] as in GPTQ's quantizer.

Scales are rounded to float16 once fitted, so that the float16 scales of the GPTQ v1 format and the
float32 scales of compressed-tensors describe exactly the same weights as the in-memory model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FP16_MIN_NORMAL = 2.0 ** -14


@dataclass
class QuantParams:
    """Everything an exporter needs to write one quantized Linear."""

    codes: torch.Tensor  # (out, in) uint8, values in [0, 2^bits − 1]
    scale: torch.Tensor  # (out, groups) float32, float16-representable
    zero: torch.Tensor  # (out, groups) int32, values in [0, 2^bits − 1]
    g_idx: torch.Tensor  # (in,) int32: the group of every input column
    bits: int
    group_size: int  # -1: one group per output row
    sym: bool

    def rows(self, start: int, stop: int) -> "QuantParams":
        """The grid of output rows [start, stop) (modules quantized together, exported apart)."""
        return QuantParams(self.codes[start:stop].clone(), self.scale[start:stop].clone(),
                           self.zero[start:stop].clone(), self.g_idx.clone(), self.bits, self.group_size, self.sym)

    def dequantize(self) -> torch.Tensor:
        """ŵ = (q − z) · s, (out, in) float32."""
        index = self.g_idx.long()
        return (self.codes.float() - self.zero[:, index].float()) * self.scale[:, index]


def max_code(bits: int) -> int:
    return 2 ** bits - 1


def _round_scale(scale: torch.Tensor) -> torch.Tensor:
    return scale.clamp_min(FP16_MIN_NORMAL).half().float()


def row_range(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(min(w, 0), max(w, 0)) of every row of ``w`` (rows, cols)."""
    return w.min(dim=1).values.clamp_max(0), w.max(dim=1).values.clamp_min(0)


def minmax_grid(w: torch.Tensor, bits: int, sym: bool, shrink: float | torch.Tensor = 1.0,
                range_: tuple[torch.Tensor, torch.Tensor] | None = None):
    """Scale and zero point of each row of ``w`` (rows, cols) from its (shrunk) range; (rows,) each.

    ``range_`` is ``row_range(w)`` when the caller already has it."""
    maxq = max_code(bits)
    lo, hi = range_ if range_ is not None else row_range(w)
    lo, hi = lo * shrink, hi * shrink
    if sym:
        hi = torch.maximum(lo.abs(), hi)
        scale = _round_scale(2 * hi / maxq)
        zero = torch.full_like(scale, (maxq + 1) // 2)
    else:
        scale = _round_scale((hi - lo) / maxq)
        # z ≥ 1: the GPTQ v1 layout stores z − 1 in b bits, so z = 0 would not survive the export
        # (it only arises for a group with no negative weight, which then loses one grid step).
        zero = torch.round(-lo / scale).clamp(1, maxq)
    return scale, zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """q = clamp(round(w / s) + z, 0, 2^b − 1) with scale and zero broadcast against ``w``."""
    return torch.clamp(torch.round(w / scale) + zero, 0, max_code(bits))


def fake_quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    return (quantize_codes(w, scale, zero, bits) - zero) * scale


def fit_grid(w: torch.Tensor, bits: int, sym: bool, clip_search: bool = False, grid: int = 20,
             clip_min: float = 0.75, norm: float = 2.4) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point of every row of ``w`` (rows, cols).

    With ``clip_search`` the range is shrunk by the factor in ``[clip_min, 1]`` that minimizes
    Σ|w − ŵ|^norm of the row (the MSE-style search of GPTQ's quantizer): clipping a few outliers buys
    a finer step for all other weights.
    """
    w = w.float()
    range_ = row_range(w)
    scale, zero = minmax_grid(w, bits, sym, range_=range_)
    if not clip_search or grid <= 1:
        return scale, zero
    best = (fake_quantize(w, scale[:, None], zero[:, None], bits) - w).abs().pow(norm).sum(1)
    for k in range(1, grid):
        shrink = 1.0 - (1.0 - clip_min) * k / (grid - 1)
        s, z = minmax_grid(w, bits, sym, shrink, range_=range_)
        err = (fake_quantize(w, s[:, None], z[:, None], bits) - w).abs().pow(norm).sum(1)
        better = err < best
        best = torch.where(better, err, best)
        scale = torch.where(better, s, scale)
        zero = torch.where(better, z, zero)
    return scale, zero


def group_grids(w: torch.Tensor, bits: int, group_size: int, sym: bool, **search) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero of every (row, group) of ``w`` (out, in): two (out, groups) tensors."""
    out, width = w.shape
    size = width if group_size == -1 else group_size
    groups = width // size
    rows = w.reshape(out, groups, size).reshape(out * groups, size)  # (out·groups, size)
    scale, zero = fit_grid(rows, bits, sym, **search)
    return scale.reshape(out, groups), zero.reshape(out, groups)


def static_g_idx(width: int, group_size: int) -> torch.Tensor:
    """Group of every input column when groups are fixed by the original column index."""
    if group_size == -1:
        return torch.zeros(width, dtype=torch.int32)
    return (torch.arange(width) // group_size).to(torch.int32)


def search_options(config) -> dict:
    return dict(clip_search=config.clip_search, grid=config.clip_grid, clip_min=config.clip_min, norm=config.clip_norm)


def rtn_quantize(w: torch.Tensor, config) -> QuantParams:
    """Round-to-nearest of a whole weight matrix (out, in) on static groups."""
    w = w.float()
    scale, zero = group_grids(w, config.bits, config.group_size, config.sym, **search_options(config))
    g_idx = static_g_idx(w.shape[1], config.group_size)
    index = g_idx.long()
    codes = quantize_codes(w, scale[:, index], zero[:, index], config.bits)
    return QuantParams(codes.to(torch.uint8), scale, zero.to(torch.int32), g_idx, config.bits, config.group_size, config.sym)
