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

from compress.plugin import Group, LayerMethod
from compress.methods.slimgpt.method import ATTENTION, MLP, SlimGPT
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
            return self._attention(layer.self_attn, plan, shape, stats.get(ATTENTION))
        return self._mlp(layer.mlp, plan, stats.get(MLP))

    def _column_scores(self, weight: torch.Tensor, stat) -> torch.Tensor:
        """Per input column of o_proj/down_proj: Σ_i W_ij² (magnitude) or Σ_i |W_ij|·‖X_j‖ (wanda-sp)."""
        if self.score == "magnitude":
            return weight.float().pow(2).sum(0)
        return (weight.float().abs() * stat.channel_norms().float().to(weight.device)).sum(0)

    def _attention(self, attn, plan, shape, stat) -> dict:
        d, groups = shape.head_dim, shape.heads // shape.kv_heads
        col = self._column_scores(attn.o_proj.weight, stat).reshape(shape.heads, d).sum(1)  # (heads,)
        if self.score == "magnitude":
            col = col + attn.q_proj.weight.float().pow(2).reshape(shape.heads, d, -1).sum((1, 2))
        per_group = col.reshape(shape.kv_heads, groups)  # (kv, groups): query heads of each KV head
        if plan.unit == "query":
            per_kv = plan.heads_removed // shape.kv_heads
            drop = per_group.argsort(dim=1)[:, :per_kv]  # lowest heads inside every KV group
            removed = {g * groups + int(j) for g in range(shape.kv_heads) for j in drop[g]}
            kept_kv = list(range(shape.kv_heads))
        else:
            kv_score = per_group.sum(1)
            if self.score == "magnitude":
                kv_score = kv_score + sum(m.weight.float().pow(2).reshape(shape.kv_heads, -1).sum(1)
                                          for m in (attn.k_proj, attn.v_proj))
            dropped = set(kv_score.argsort()[:plan.kv_removed].tolist())
            kept_kv = [g for g in range(shape.kv_heads) if g not in dropped]
            removed = {g * groups + j for g in dropped for j in range(groups)}
        kept = [h for h in range(shape.heads) if h not in removed]
        shrink_attention(attn, attn.o_proj.weight.detach(), kept, kept_kv, d)
        return {"heads_kept": len(kept)}

    def _mlp(self, mlp, plan, stat) -> dict:
        score = self._column_scores(mlp.down_proj.weight, stat)
        if self.score == "magnitude":
            score = score + mlp.gate_proj.weight.float().pow(2).sum(1) + mlp.up_proj.weight.float().pow(2).sum(1)
        drop = set(score.argsort()[:plan.channels_removed].tolist())
        kept = [j for j in range(score.numel()) if j not in drop]
        shrink_mlp(mlp, mlp.down_proj.weight.detach(), kept)
        return {"ffn_kept": len(kept)}
