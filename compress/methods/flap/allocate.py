"""FLAP's adaptive structure: one global threshold over standardized scores of every prunable unit.

Each layer contributes, per module kind (attention units, FFN channels), its units' scores in
ascending order, standardized over that layer and kind, and the parameter cost of one unit. All
units of the model are ranked together by score and the shortest prefix whose cumulative cost is
closest to the target is removed (FLAP's ``argmin |cumsum − target|``). Within one layer and kind the
scores are ascending, so every layer loses a prefix of its own order: the lowest-scoring units.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compress.errors import CompressError


@dataclass
class UnitScores:
    layer: int
    kind: str  # "attention" or "mlp"
    scores: torch.Tensor  # (units,) ascending, standardized within the layer and kind
    unit_cost: int  # parameters removed with one unit


def standardize(scores: torch.Tensor) -> torch.Tensor:
    """(x − mean) / std over one layer's units of one kind (FLAP's per-layer standardization); a
    constant score vector becomes zeros."""
    scores = scores.double()
    std = scores.std() if scores.numel() > 1 else torch.tensor(0.0, dtype=torch.float64)
    centred = scores - scores.mean()
    return centred / std if float(std) > 0 else centred


def allocate(units: list[UnitScores], target: float) -> dict[tuple[int, str], int]:
    """How many units of each (layer, kind) one global threshold removes so that the removed
    parameters are closest to ``target``. Raises CompressError when that empties a layer's module."""
    scores = torch.cat([u.scores.double() for u in units])
    costs = torch.cat([torch.full((u.scores.numel(),), float(u.unit_cost), dtype=torch.float64) for u in units])
    owner = torch.cat([torch.full((u.scores.numel(),), i, dtype=torch.long) for i, u in enumerate(units)])
    order = torch.sort(scores, stable=True).indices
    cumulative = torch.cumsum(costs[order], 0)
    count = int(torch.argmin((cumulative - target).abs())) + 1  # units removed, lowest scores first
    removed = torch.bincount(owner[order[:count]], minlength=len(units))
    result = {}
    for unit, n in zip(units, removed.tolist()):
        if n >= unit.scores.numel():
            what = "attention unit" if unit.kind == "attention" else "FFN channel"
            raise CompressError(f"FLAP's global threshold would remove every {what} of layer {unit.layer} "
                                f"to reach the ratio; choose a lower --ratio")
        result[(unit.layer, unit.kind)] = n
    return result
