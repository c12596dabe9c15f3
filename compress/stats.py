"""Streaming statistics of a Linear layer's inputs, accumulated batch by batch.

For inputs X of shape (tokens, in_features) seen over the calibration set:

* ``xtx``  the Gram matrix Σ xᵀx (in × in), the Hessian of the layer-wise squared error up to 2/N;
* ``sq``   the per-input-channel sum of squares Σ x_j² (the Gram matrix's diagonal), which is all
  that activation-norm methods (Wanda, FLAP) need, at O(in) memory.

Accumulation is in float32 by default (float64 on request); inputs are never held.
"""

from __future__ import annotations

import torch


class HessianAccumulator:
    """Accumulate Σ xᵀx and Σ x² over batches of a Linear layer's inputs."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 gram: bool = True):
        self.in_features = in_features
        self.dtype = dtype
        self.xtx = torch.zeros(in_features, in_features, device=device, dtype=dtype) if gram else None
        self.sq = torch.zeros(in_features, device=device, dtype=dtype)
        self.count = 0  # number of token rows seen

    def add_batch(self, inp: torch.Tensor) -> None:
        """Add inputs of shape (..., in_features)."""
        x = inp.reshape(-1, inp.shape[-1]).to(self.sq.device, self.dtype)  # (tokens, in)
        if x.shape[1] != self.in_features:
            raise ValueError(f"input width {x.shape[1]} != {self.in_features}")
        if self.xtx is not None:
            self.xtx.addmm_(x.t(), x)
        self.sq += x.pow(2).sum(0)
        self.count += x.shape[0]

    def hessian(self) -> torch.Tensor:
        """H = 2/N Σ xᵀx, the form GPTQ and SlimGPT use (in × in)."""
        if self.xtx is None:
            raise RuntimeError("this accumulator keeps only channel norms")
        return self.xtx * (2.0 / max(self.count, 1))

    def channel_norms(self) -> torch.Tensor:
        """‖X_j‖₂ over all tokens for every input channel j (Wanda's activation norm)."""
        return self.sq.sqrt()

    def free(self) -> None:
        self.xtx = None
        self.sq = None
