"""Optimal Brain Surgeon removal of whole input columns of one Linear weight, as SlimGPT does it.

Everything here works on a plain weight ``W`` (out × in) and the Hessian ``H`` (in × in) of the
layer-wise error ‖W X − Ŵ X‖², H = 2 X Xᵀ / N. Removing a set S of input columns and compensating
the others optimally (OBS, SlimGPT Eq. 2–3) costs

    ΔE_S = tr( W_S [H⁻¹]_SS⁻¹ W_Sᵀ )            (in units of H: ‖W X − Ŵ X‖² = ΔE · N / 2)
    ΔW   = − W_S [H⁻¹]_SS⁻¹ [H⁻¹]_S,:           (the surviving columns absorb the loss)

and afterwards H⁻¹ of the survivors is the Schur complement H⁻¹_RR − H⁻¹_RS [H⁻¹]_SS⁻¹ H⁻¹_SR.

* Heads (``prune_column_groups``): S is one head's ``head_dim`` columns of ``o_proj``. With the
  Cholesky factor [H⁻¹]_SS = L Lᵀ the error is ‖W_S L⁻ᵀ‖²_F (grouped Cholesky, SlimGPT §3.2), computed
  for every remaining head in one batched call. Batched Greedy Pruning: remove the lowest-error head,
  update W and H⁻¹, recompute, repeat.
* FFN channels (``prune_channels``): single columns scored by ‖W_:j‖² / [H⁻¹]_jj, removed in batches
  whose size shrinks (Dynamic Group Size: one large batch first, then small ones), each batch jointly
  with the exact block OBS update above.

The greedy sequence's errors add up exactly (each step is an orthogonal projection onto a smaller
subspace), so the sum of the returned step errors is the final reconstruction error.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class PruneResult:
    weight: torch.Tensor  # (out, in) compensated, removed columns set to zero
    removed: list[int]  # removed units (heads or channels), in removal order
    kept: list[int]  # surviving units, ascending
    errors: list[float] = field(default_factory=list)  # ΔE of every step (units of H)

    @property
    def total_error(self) -> float:
        return float(sum(self.errors))


def damp_(H: torch.Tensor, damping: float) -> torch.Tensor:
    """In place: a dead input (H_jj = 0, its row and column zero) gets H_jj = 1, then every diagonal entry
    grows by ``damping`` × mean(diag H). Returns ``H``."""
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    diag = torch.arange(H.shape[0], device=H.device)
    H[diag, diag] += damping * torch.mean(torch.diag(H))
    return H


def damped_inverse_hessian(hessian: torch.Tensor, weight: torch.Tensor, damping: float,
                           dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """H⁻¹ after damping by ``damping`` × mean(diag H); dead inputs get H_jj = 1 and a zero column.

    Returns (H⁻¹, W) in ``dtype``; ``W`` is a copy with dead columns zeroed (they carry no signal).
    """
    H = hessian.to(dtype, copy=True)
    W = weight.detach().to(dtype).clone()
    W[:, torch.diag(H) == 0] = 0.0
    damp_(H, damping)
    L = torch.linalg.cholesky(H)
    del H  # freed before H⁻¹ is made: two n×n float64 matrices at a time, not three
    return torch.cholesky_inverse(L), W


def _remove_block(W: torch.Tensor, Hinv: torch.Tensor, alive: torch.Tensor, cols: torch.Tensor) -> float:
    """OBS-remove columns ``cols`` (original indices) of W; update W and H⁻¹ in place. Returns ΔE."""
    pos = torch.searchsorted(alive, cols)  # positions of cols among alive columns
    block = Hinv[pos][:, pos]  # (s, s)  [H⁻¹]_SS
    L = torch.linalg.cholesky(block)
    Ws = W[:, cols]  # (out, s)
    # Ws [H⁻¹]_SS⁻¹ via two triangular solves: X = Ws L⁻ᵀ L⁻¹
    WsLT = torch.linalg.solve_triangular(L, Ws.T, upper=False).T  # (out, s) = Ws L⁻ᵀ
    error = float(WsLT.pow(2).sum())
    coeff = torch.linalg.solve_triangular(L.T, WsLT.T, upper=True).T  # (out, s) = Ws [H⁻¹]_SS⁻¹
    rows = Hinv[pos]  # (s, a)  [H⁻¹]_S,:
    W[:, alive] -= coeff @ rows
    W[:, cols] = 0.0
    # Schur complement: H⁻¹ ← H⁻¹ − H⁻¹_:S [H⁻¹]_SS⁻¹ H⁻¹_S:
    Hinv -= rows.T @ torch.cholesky_solve(rows, L)
    return error


def _shrink(Hinv: torch.Tensor, alive: torch.Tensor, cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    keep = (~torch.isin(alive, cols)).nonzero().squeeze(1)
    return Hinv[keep[:, None], keep], alive[keep]  # one gather: no (kept × alive) intermediate


def head_errors(W: torch.Tensor, Hinv: torch.Tensor, alive: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """ΔE of removing each group of columns alone: ‖W_S L⁻ᵀ‖² with [H⁻¹]_SS = L Lᵀ, batched over groups.

    ``groups`` (g, s) holds original column indices that are all alive.
    """
    pos = torch.searchsorted(alive, groups.reshape(-1)).reshape(groups.shape)  # (g, s)
    blocks = Hinv[pos.unsqueeze(-1), pos.unsqueeze(-2)]  # (g, s, s)
    L = torch.linalg.cholesky(blocks)  # grouped Cholesky
    Ws = W[:, groups].permute(1, 2, 0)  # (g, s, out)
    scaled = torch.linalg.solve_triangular(L, Ws, upper=False)  # (g, s, out) = L⁻¹ W_Sᵀ
    return scaled.pow(2).sum(dim=(1, 2))  # (g,)


def prune_column_groups(weight: torch.Tensor, hessian: torch.Tensor, group_size: int, n_remove: int, *,
                        damping: float = 0.01, partition: list[list[int]] | None = None,
                        dtype: torch.dtype = torch.float64) -> PruneResult:
    """Batched Greedy Pruning of ``n_remove`` groups of ``group_size`` consecutive input columns.

    ``partition`` (optional) splits the groups into sets that must lose the same number of groups
    (query heads of the KV groups under grouped-query attention): a set that has already lost
    ``n_remove / len(partition)`` groups is no longer a candidate.
    """
    out_features, in_features = weight.shape
    n_groups = in_features // group_size
    if n_groups * group_size != in_features:
        raise ValueError(f"{in_features} columns are not a whole number of groups of {group_size}")
    Hinv, W = damped_inverse_hessian(hessian, weight, damping, dtype)
    alive = torch.arange(in_features, device=W.device)
    remaining = list(range(n_groups))
    set_of = {}
    quota = n_remove
    if partition:
        if n_remove % len(partition):
            raise ValueError(f"{n_remove} removals cannot be spread evenly over {len(partition)} sets")
        quota = n_remove // len(partition)
        set_of = {g: k for k, members in enumerate(partition) for g in members}
    lost = [0] * max(len(partition or []), 1)
    result = PruneResult(weight=W, removed=[], kept=[])
    for _ in range(n_remove):
        candidates = [g for g in remaining if lost[set_of.get(g, 0)] < quota]
        cols = torch.tensor([[g * group_size + j for j in range(group_size)] for g in candidates], device=W.device)
        errors = head_errors(W, Hinv, alive, cols)
        best = int(torch.argmin(errors))
        chosen = candidates[best]
        result.errors.append(_remove_block(W, Hinv, alive, cols[best]))
        Hinv, alive = _shrink(Hinv, alive, cols[best])
        remaining.remove(chosen)
        lost[set_of.get(chosen, 0)] += 1
        result.removed.append(chosen)
    result.kept = sorted(remaining)
    return result


def dynamic_group_sizes(n_remove: int, first_cap: int = 1024, small: int = 64, offset: int = 512) -> list[int]:
    """Batch sizes that remove ``n_remove`` channels: (n − offset)/2 first (at most ``first_cap``),
    then batches of ``small`` (the public SlimGPT code's Dynamic Group Size)."""
    sizes = []
    first = min(first_cap, max(0, (n_remove - offset) // 2))
    if first > 0:
        sizes.append(first)
    left = n_remove - first
    while left > 0:
        sizes.append(min(small, left))
        left -= sizes[-1]
    return sizes


def prune_channels(weight: torch.Tensor, hessian: torch.Tensor, n_remove: int, *, damping: float = 0.01,
                   batch_sizes: list[int] | None = None, dtype: torch.dtype = torch.float64) -> PruneResult:
    """Remove ``n_remove`` input columns (FFN channels of ``down_proj``) in shrinking batches with OBS.

    Each batch takes the lowest-scoring channels, score ‖W_:j‖² / [H⁻¹]_jj (SlimGPT Eq. 2 for one
    column), and is removed jointly with the exact block update.
    """
    Hinv, W = damped_inverse_hessian(hessian, weight, damping, dtype)
    alive = torch.arange(W.shape[1], device=W.device)
    sizes = batch_sizes if batch_sizes is not None else dynamic_group_sizes(n_remove)
    if sum(sizes) != n_remove:
        raise ValueError(f"batch sizes {sizes} do not add up to {n_remove}")
    result = PruneResult(weight=W, removed=[], kept=[])
    for size in sizes:
        scores = W[:, alive].pow(2).sum(0) / torch.diag(Hinv)  # (alive,)
        order = torch.argsort(scores)[:size]
        cols = alive[order].sort().values
        result.errors.append(_remove_block(W, Hinv, alive, cols))
        Hinv, alive = _shrink(Hinv, alive, cols)
        result.removed.extend(cols.tolist())
    result.kept = alive.tolist()
    return result
