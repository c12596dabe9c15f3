"""Low-rank diff vectors: a truncated SVD of each matrix's Δ.

Δ = U Σ Vᵀ (float64, exact SVD); keeping the K largest singular values gives the best rank-K
approximation Δ_K = U_K Σ_K V_Kᵀ (Eckart–Young), whose error is the energy of what was dropped:
‖Δ − Δ_K‖²_F = Σ_{i>K} σ_i². The factors are stored as ``u`` = U_K Σ_K (m, K) and ``v`` = V_Kᵀ (K, n),
so a diff of an m×n matrix ships in K·(m + n) numbers instead of m·n.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LowRankDelta:
    """Δ ≈ u @ v for one matrix; ``dropped_energy`` = Σ_{i>K} σ_i², ``energy`` = ‖Δ‖²_F = Σ σ_i²."""

    u: torch.Tensor  # (m, K), U_K Σ_K
    v: torch.Tensor  # (K, n), V_Kᵀ
    energy: float
    dropped_energy: float

    @property
    def rank(self) -> int:
        return self.u.shape[1]

    @property
    def kept_energy(self) -> float:
        """Fraction of ‖Δ‖² that the kept singular values carry (1.0 for a zero Δ)."""
        return 1.0 - self.dropped_energy / self.energy if self.energy > 0 else 1.0

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of Δ_K in float64."""
        return self.u[start:stop].double() @ self.v.double()  # (stop-start, K) @ (K, n)


def truncated_svd(delta: torch.Tensor, rank: int) -> LowRankDelta:
    """The best rank-``rank`` approximation of a 2-D ``delta``, computed in float64."""
    delta = delta.double()
    if not delta.any():  # a tensor the fine-tune left alone: no SVD needed
        keep = min(rank, *delta.shape)
        return LowRankDelta(u=delta.new_zeros(delta.shape[0], keep), v=delta.new_zeros(keep, delta.shape[1]),
                            energy=0.0, dropped_energy=0.0)
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)  # (m, r), (r,), (r, n) with r = min(m, n)
    keep = min(rank, s.numel())
    energy = float(s.square().sum())
    dropped = float(s[keep:].square().sum())
    return LowRankDelta(u=u[:, :keep] * s[:keep], v=vh[:keep].clone(), energy=energy, dropped_energy=dropped)


def wants_low_rank(shape: tuple[int, ...], rank: int | None) -> bool:
    """Every matrix is factored when a rank is asked for; vectors (norms, biases) stay dense."""
    return rank is not None and len(shape) == 2
