"""Structured-pruning baselines for the SlimGPT benchmark, on exactly SlimGPT's per-layer plan.

* ``magnitude``: a head's score is the squared L2 norm of its weights (q rows, o columns, and k/v rows
  when whole KV groups go); an FFN channel's is that of its gate/up rows and down column. No data.
* ``wanda-sp`` (activation-weighted, the Wanda-sp / FLAP family): Σ_i |W_ij| · ‖X_j‖ over the
  structure's columns of o_proj / down_proj, with ‖X_j‖ the input norms collected layer by layer by
  the walk on the already-pruned model (so the inputs are the ones the pruned model sees).

Both remove the lowest-scoring units and do not compensate the remaining weights. They take the same
heads/channels counts per layer as SlimGPT's plan, so the parameter counts match exactly.
"""

from __future__ import annotations

import torch

from compress import arch
from compress.plugin import Group, LayerMethod
from compress.methods.slimgpt.method import SlimGPT
from compress.methods.slimgpt.shrink import shrink_attention, shrink_mlp


class StructuredBaseline(LayerMethod):
    """Score-and-remove on a SlimGPT plan. ``score`` is "magnitude" or "wanda-sp"."""

    name = "baseline"

    def __init__(self, score: str, planner: SlimGPT):
        super().__init__(planner.config)
        self.score = score
        self.planner = planner

    def groups(self, layer, index):
        stats = "none" if self.score == "magnitude" else "norm"
        return [Group(g.modules, stats=stats, name=g.name) for g in self.planner.groups(layer, index)]

    def apply(self, ctx):
        layer, group, stats = ctx.layer, ctx.group, ctx.stats
        plan, shape = self.planner.plans[ctx.index], self.planner.shapes[ctx.index]
        if group.name == "attention":
            return self._attention(layer, plan, shape, stats.get(arch.O))
        return self._mlp(layer, plan, stats.get(arch.DOWN))

    def _column_scores(self, weight: torch.Tensor, stat) -> torch.Tensor:
        """Per input column of o_proj/down_proj: Σ_i W_ij² (magnitude) or Σ_i |W_ij|·‖X_j‖ (wanda-sp)."""
        if self.score == "magnitude":
            return weight.float().pow(2).sum(0)
        return (weight.float().abs() * stat.channel_norms().float().to(weight.device)).sum(0)

    def _attention(self, layer, plan, shape, stat) -> dict:
        d = shape.head_dim
        o_proj, q_proj = arch.projection(layer, arch.O), arch.projection(layer, arch.Q)
        heads_of = arch.kv_groups(shape.heads, shape.kv_heads)  # query heads of each KV head
        col = self._column_scores(o_proj.weight, stat).reshape(shape.heads, d).sum(1)  # (heads,)
        if self.score == "magnitude":
            col = col + q_proj.weight.float().pow(2).reshape(shape.heads, d, -1).sum((1, 2))
        per_group = col[torch.tensor(heads_of)]  # (kv, groups)
        if plan.unit == "query":
            per_kv = plan.heads_removed // shape.kv_heads
            drop = per_group.argsort(dim=1)[:, :per_kv]  # lowest heads inside every KV group
            removed = {heads_of[g][int(j)] for g in range(shape.kv_heads) for j in drop[g]}
            kept_kv = list(range(shape.kv_heads))
        else:
            kv_score = per_group.sum(1)
            if self.score == "magnitude":
                kv_score = kv_score + sum(arch.projection(layer, n).weight.float().pow(2).reshape(shape.kv_heads, -1)
                                          .sum(1) for n in arch.KV)
            dropped = set(kv_score.argsort()[:plan.kv_removed].tolist())
            kept_kv = [g for g in range(shape.kv_heads) if g not in dropped]
            removed = {h for g in dropped for h in heads_of[g]}
        kept = [h for h in range(shape.heads) if h not in removed]
        shrink_attention(getattr(layer, arch.ATTENTION), o_proj.weight.detach(), kept, kept_kv, d)
        return {"heads_kept": len(kept)}

    def _mlp(self, layer, plan, stat) -> dict:
        down = arch.projection(layer, arch.DOWN)
        score = self._column_scores(down.weight, stat)
        if self.score == "magnitude":
            score = score + sum(arch.projection(layer, n).weight.float().pow(2).sum(1) for n in arch.MLP_IN)
        drop = set(score.argsort()[:plan.channels_removed].tolist())
        kept = [j for j in range(score.numel()) if j not in drop]
        shrink_mlp(getattr(layer, arch.MLP), down.weight.detach(), kept)
        return {"ffn_kept": len(kept)}
