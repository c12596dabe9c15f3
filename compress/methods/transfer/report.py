"""The compatibility report: how big the fine-tuning diff is, and how far apart the two versions are.

Per tensor (over the rows the three models share): ``delta_rel`` = ‖θ_ft − θ_base‖ / ‖θ_base‖ and
``drift_rel`` = ‖θ_target − θ_base‖ / ‖θ_base‖ (Frobenius norms in float64), and the cosine between
the target and the source base. The paper's transfer works when the versions are linearly connected:
a continued-pretraining successor stays close to its predecessor (a drift of a few percent to some
tens of percent), while two unrelated models of the same shape (different initializations) have a
drift near √2 and a cosine near 0. A warning is raised when the median over tensors of the drift
passes ``warn_drift`` or the median cosine falls below ``warn_cosine``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

WARN_DRIFT = 0.5
WARN_COSINE = 0.8


@dataclass
class TensorStats:
    """Sums of squares and products accumulated block by block (float64)."""

    name: str
    base_sq: float = 0.0
    delta_sq: float = 0.0
    drift_sq: float = 0.0
    target_sq: float = 0.0
    target_dot_base: float = 0.0
    kept_energy: float | None = None  # low-rank only: fraction of ‖Δ‖² kept by the truncated SVD

    has_base: bool = True  # False when applying a diff artifact: the source base is not known

    def add(self, base: torch.Tensor | None, target: torch.Tensor, delta: torch.Tensor) -> None:
        """Accumulate one block of rows (float64, same shape); ``base`` None: sizes relative to the target."""
        if base is None:
            self.has_base = False
            base = target
        # Dot products of flat views: one pass each, no squared temporaries.
        base, target, delta = base.reshape(-1), target.reshape(-1), delta.reshape(-1)
        self.base_sq += float(torch.dot(base, base))
        self.delta_sq += float(torch.dot(delta, delta))
        drift = target - base
        self.drift_sq += float(torch.dot(drift, drift))
        self.target_sq += float(torch.dot(target, target))
        self.target_dot_base += float(torch.dot(target, base))

    def row(self) -> dict:
        base = math.sqrt(self.base_sq)
        cosine = self.target_dot_base / math.sqrt(self.target_sq * self.base_sq) if self.target_sq * self.base_sq else 1.0
        out = {"tensor": self.name, "delta_rel": math.sqrt(self.delta_sq) / base if base else math.inf,
               "drift_rel": math.sqrt(self.drift_sq) / base if base else math.inf, "cosine": cosine}
        if not self.has_base:
            out["drift_rel"] = out["cosine"] = math.nan
        if self.kept_energy is not None:
            out["kept_energy"] = self.kept_energy
        return out


@dataclass
class CompatibilityReport:
    tensors: list[TensorStats] = field(default_factory=list)
    warn_drift: float = WARN_DRIFT
    warn_cosine: float = WARN_COSINE

    def total(self) -> dict:
        """Whole-model numbers: the same ratios over all tensors concatenated."""
        agg = TensorStats("(all)")
        for t in self.tensors:
            agg.has_base = agg.has_base and t.has_base
            agg.base_sq += t.base_sq
            agg.delta_sq += t.delta_sq
            agg.drift_sq += t.drift_sq
            agg.target_sq += t.target_sq
            agg.target_dot_base += t.target_dot_base
        return agg.row()

    def median(self) -> dict:
        """Median over tensors of the per-tensor ratios: the warning's statistic.

        A whole-model ratio is dominated by whatever tensors hold the most energy (in small models the
        norm weights, all near 1, which barely move between versions); the median weighs every
        tensor alike, and for unrelated models most tensors sit near √2.
        """
        rows = [t.row() for t in self.tensors]
        med = lambda key: float(torch.tensor([r[key] for r in rows], dtype=torch.float64).median())  # noqa: E731
        return {"tensor": "(median)", "delta_rel": med("delta_rel"), "drift_rel": med("drift_rel"),
                "cosine": med("cosine")}

    def warnings(self) -> list[str]:
        if not self.tensors:
            return []
        typical = self.median()
        out = []
        if typical["drift_rel"] > self.warn_drift or typical["cosine"] < self.warn_cosine:
            out.append(f"the target base does not look like a version of the source base: median over tensors "
                       f"of ‖target − source base‖/‖source base‖ = {typical['drift_rel']:.3g} (warn above "
                       f"{self.warn_drift}), of cosine(target, source base) = {typical['cosine']:.3g} (warn "
                       f"below {self.warn_cosine}); the transferred diff may not help")
        if self.total()["delta_rel"] == 0:
            out.append("the fine-tuned model equals the source base: the diff is zero")
        return out

    def rows(self, top: int | None = None) -> list[dict]:
        """Per-tensor rows, largest drift first when ``top`` limits them."""
        rows = [t.row() for t in self.tensors]
        if top is not None:
            rows = sorted(rows, key=lambda r: -r["drift_rel"])[:top]
        return rows

    def as_dict(self) -> dict:
        return {"total": self.total(), "median": self.median(), "warnings": self.warnings(), "warn_drift": self.warn_drift,
                "warn_cosine": self.warn_cosine, "tensors": self.rows()}

