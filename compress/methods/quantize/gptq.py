"""GPTQ on one Linear layer (Frantar et al., "GPTQ", ICLR 2023; after IST-DASLab/gptq gptq.py).

Given the Hessian H = 2/N · X Xᵀ of the layer's inputs (in × in), GPTQ quantizes W (out × in) one
column at a time and moves each column's rounding error onto the columns not yet quantized (eq. 2,
the OBS update δ = −(w_q − q)/[H⁻¹]_qq · H⁻¹_{:,q}), using the upper Cholesky factor of H⁻¹ in place
of the sequentially reduced inverses (Step 3 of the paper), and applying the updates lazily in blocks
of ``block_size`` columns (Step 2) so that most of the work is one matrix product per block.
"""

from __future__ import annotations

import logging

import torch

from compress.methods.quantize.grid import (
    QuantParams, fit_grid, group_grids, max_code, search_options, static_g_idx,
)

log = logging.getLogger(__name__)


class CholeskyFailed(Exception):
    """Raised when H + λI is not positive definite even at the largest dampening tried."""


def inverse_hessian_factor(hessian: torch.Tensor, damp: float, retries: int) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of (H + λI)⁻¹ with λ = damp · mean(diag H), retrying with 10× λ.

    Returns the factor and the relative dampening that worked.
    """
    mean_diag = hessian.diagonal().mean()
    for attempt in range(retries + 1):
        rel = damp * 10.0 ** attempt
        damped = hessian.clone()  # H + λI without an identity matrix: at most two n×n work matrices alive
        damped.diagonal().add_(rel * mean_diag)
        factor, info = torch.linalg.cholesky_ex(damped)
        del damped
        if info.item() == 0:
            inverse = torch.cholesky_inverse(factor)
            del factor
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            del inverse
            if info.item() == 0 and torch.isfinite(upper).all():
                if attempt:
                    log.info("Cholesky succeeded at dampening %.3g after %d retries", rel, attempt)
                return upper, rel
        log.debug("Cholesky failed at dampening %.3g", rel)
    raise CholeskyFailed(f"H + λI is not positive definite up to dampening {rel:.3g}")


class GPTQ:
    """Quantize one weight matrix with its input Hessian. ``quantize`` returns the codes and grid."""

    def __init__(self, weight: torch.Tensor, hessian: torch.Tensor):
        self.weight = weight  # (out, in), not modified
        self.hessian = hessian  # (in, in), not modified

    @torch.no_grad()
    def quantize(self, config) -> tuple[QuantParams, dict]:
        bits, size, maxq = config.bits, config.group_size, max_code(config.bits)
        w = self.weight.detach().float().clone()  # (out, in)
        out, width = w.shape
        h = self.hessian.float().clone()
        dead = h.diagonal() == 0  # inputs that are always zero: any weight does; keep the factor regular
        h[dead, dead] = 1.0
        w[:, dead] = 0.0
        g_idx = static_g_idx(width, size)

        # Static groups: every grid fitted on the original weights up front (needed when the order is
        # permuted; also the default, as dynamic grids fitted on the error-updated weights widen with
        # the feedback and lose at 2 bits). Dynamic: fitted when a group's first column is reached.
        static = config.static_groups or config.act_order or size == -1
        scale = torch.zeros(out, width // (width if size == -1 else size))
        zero = torch.zeros_like(scale)
        if static:
            scale, zero = group_grids(w, bits, size, config.sym, **search_options(config))

        perm = torch.arange(width)
        if config.act_order:  # desc_act: columns with the largest Hessian diagonal first
            perm = torch.argsort(h.diagonal(), descending=True, stable=True)
            w = w[:, perm]
            h = h[perm][:, perm]
        hinv, damp_used = inverse_hessian_factor(h, config.damp, config.damp_retries)
        col_group = g_idx[perm].long()  # group of the column quantized at each position

        codes = torch.zeros(out, width)
        block = config.block_size
        for i1 in range(0, width, block):
            i2 = min(i1 + block, width)
            w1 = w[:, i1:i2].clone()  # (out, B): this block, updated in place column by column
            err1 = torch.zeros_like(w1)
            hinv1 = hinv[i1:i2, i1:i2]
            for i in range(i2 - i1):
                col = i1 + i
                g = int(col_group[col])
                if not static and col % size == 0:
                    # the group's current weights: the rest of this block, then the untouched columns
                    current = torch.cat([w1[:, i:i + size], w[:, i2:col + size]], dim=1)
                    s, z = fit_grid(current, bits, config.sym, **search_options(config))
                    scale[:, g], zero[:, g] = s, z
                column, s, z = w1[:, i], scale[:, g], zero[:, g]
                q = torch.round(column / s).add_(z).clamp_(0, maxq)
                codes[:, col] = q
                err = (column - (q - z) * s).div_(hinv1[i, i])
                w1[:, i:].addr_(err, hinv1[i, i:], alpha=-1.0)  # eq. 2 within the block
                err1[:, i] = err
            w[:, i2:].addmm_(err1, hinv[i1:i2, i2:], alpha=-1.0)  # the block's lazy update of later columns

        if config.act_order:
            codes = codes[:, torch.argsort(perm)]
        params = QuantParams(codes.to(torch.uint8), scale, zero.to(torch.int32), g_idx, bits, size, config.sym)
        return params, {"damp": damp_used, "perm": perm}


def output_error(weight: torch.Tensor, quantized: torch.Tensor, hessian: torch.Tensor) -> float:
    """Relative layer-output error tr(ΔW H ΔWᵀ) / tr(W H Wᵀ) = ‖ΔW X‖² / ‖W X‖²."""
    weight, h = weight.float(), hessian.float()
    delta = quantized.float() - weight
    num = ((delta @ h) * delta).sum(dtype=torch.float64)
    den = ((weight @ h) * weight).sum(dtype=torch.float64).clamp_min(1e-30)
    return (num / den).item()
