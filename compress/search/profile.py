"""One read-only layer walk that fixes the importance order and scores every per-layer option.

Importance (activation-based, from the walk's statistics on the calibration tokens): an input channel j
of o_proj or down_proj scores ‖X_j‖² · ‖W_:,j‖² (the energy it writes into the residual stream if the
channels were uncorrelated); a query head sums its columns, a KV group its heads. Orders are sorted by
score, highest first, ties by index (deterministic). With ``query`` units each KV group orders its own
query heads (a unit is "the k-th best head of every group"); with ``kv`` units the groups are ordered.

Per-layer option scores (the additive proxy of the first search stage, Puzzle-style: each option scored
once with the rest of the model intact): with the layer's inputs X being the parent's hidden states,
the option (a, f) — the first ``a`` units and the first ``f`` FFN steps — gives the output
Y(a, f) = X + Attn_a(X) + FFN_f(X + Attn_a(X)), computed exactly from per-unit and per-step partial
sums; its score is Σ‖Y(a, f) − Y‖² / Σ‖Y‖² over the calibration tokens (Y the parent layer's output).
A dropped layer scores Σ‖X − Y‖² / Σ‖Y‖².
"""

from __future__ import annotations

import torch
from torch import nn

from compress import arch
from compress.plugin import Group, LayerContext, LayerMethod
from compress.search.space import SearchSpace

ATTENTION, MLP = arch.O, arch.DOWN


def column_scores(norms: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """‖X_j‖² · ‖W_:,j‖² per input column j (float64)."""
    return norms.double().pow(2) * weight.detach().double().pow(2).sum(0)


def head_order(scores: torch.Tensor, space: SearchSpace) -> list[int]:
    """The parent's query heads in importance order, as a permutation of 0..heads-1 that keeps each
    head serving its own KV head: ``query`` units sort within every group, ``kv`` units sort the groups."""
    d, G = space.head_dim, space.groups
    per_head = scores.reshape(space.heads, d).sum(1)
    if space.unit == "query":
        order = []
        for g in range(space.kv_heads):
            members = list(range(g * G, (g + 1) * G))
            order += sorted(members, key=lambda h: (-float(per_head[h]), h))
        return order
    per_group = per_head.reshape(space.kv_heads, G).sum(1)
    groups = sorted(range(space.kv_heads), key=lambda g: (-float(per_group[g]), g))
    return [g * G + j for g in groups for j in range(G)]


def channel_order(scores: torch.Tensor) -> list[int]:
    return sorted(range(scores.numel()), key=lambda j: (-float(scores[j]), j))


def kv_order(heads: list[int], space: SearchSpace) -> list[int]:
    """The KV heads in the order the query heads' groups appear in ``heads``."""
    seen = []
    for h in heads:
        g = h // space.groups
        if g not in seen:
            seen.append(g)
    return seen


def unit_heads(space: SearchSpace, units: int) -> list[int]:
    """Positions (in the reordered layer) of the query heads the first ``units`` units keep."""
    G = space.groups
    if space.unit == "query":
        return [g * G + j for g in range(space.kv_heads) for j in range(units)]
    return list(range(units * G))


class SearchProfile(LayerMethod):
    """The profiling walk (read-only): per layer the importance orders and the option score table."""

    name = "search-profile"
    needs_inputs = True
    stageable = False

    def __init__(self, space: SearchSpace):
        super().__init__(config={})
        self.space = space
        self.heads: dict[int, list[int]] = {}
        self.channels: dict[int, list[int]] = {}
        self.scores: dict[int, dict[str, float]] = {}

    def groups(self, layer, index):
        return [Group([ATTENTION], stats="norm", name="attention"), Group([MLP], stats="norm", name="mlp")]

    def apply(self, ctx: LayerContext):
        layer = ctx.layer
        name = ctx.group.modules[0]
        norms = ctx.stats[name].channel_norms()
        weight = arch.projection(layer, name).weight
        if ctx.group.name == "attention":
            self.heads[ctx.index] = head_order(column_scores(norms, weight), self.space)
            return {}
        self.channels[ctx.index] = channel_order(column_scores(norms, weight))
        self.scores[ctx.index] = option_scores(layer, ctx, self.space, self.heads[ctx.index],
                                               self.channels[ctx.index])
        return {}


@torch.no_grad()
def option_scores(layer: nn.Module, ctx: LayerContext, space: SearchSpace, heads: list[int],
                  channels: list[int]) -> dict[str, float]:
    """Relative output error of every option of this layer (keys "a,f"), see the module docstring."""
    mlp = layer.mlp
    o_proj, down = arch.projection(layer, arch.O), arch.projection(layer, arch.DOWN)
    d = space.head_dim
    A, F = space.attention_units, space.ffn_options
    head_cols = [arch.head_channels([h], d) for h in heads]  # in importance order
    # column blocks of o_proj per unit (a unit's heads, in the reordered layer's positions)
    unit_cols = []
    for u in range(A):
        positions = [p for p in unit_heads(space, u + 1) if p not in set(unit_heads(space, u))]
        unit_cols.append(torch.cat([head_cols[p] for p in positions]))
    order = torch.tensor(channels, dtype=torch.long)
    errors = torch.zeros(A + 1, F + 1, dtype=torch.float64)
    total = torch.zeros((), dtype=torch.float64)
    captured = {}
    hook = o_proj.register_forward_pre_hook(lambda m, args: captured.__setitem__("o_in", args[0]))
    try:
        for hidden, kwargs, _ in ctx.batches():
            y = arch_output(layer(hidden, **kwargs))
            o_in = captured.pop("o_in")
            total += y.pow(2).sum(dtype=torch.float64)
            attn_out = torch.zeros_like(hidden)
            w_o = o_proj.weight
            w_down = down.weight[:, order.to(hidden.device)]  # columns in importance order: steps are views
            for a in range(A + 1):
                if a > 0:
                    cols = unit_cols[a - 1].to(hidden.device)
                    attn_out = attn_out + o_in[..., cols] @ w_o[:, cols].t()
                h = hidden + attn_out + (o_proj.bias if (a > 0 and o_proj.bias is not None) else 0)
                z = layer.post_attention_layernorm(h)
                act = (mlp.act_fn(mlp.gate_proj(z)) * mlp.up_proj(z))[..., order.to(hidden.device)]
                diff = h - y  # Y(a, f) − Y, updated step by step
                errors[a, 0] += diff.pow(2).sum(dtype=torch.float64)
                for f in range(F):
                    cols = slice(f * space.ffn_step, (f + 1) * space.ffn_step)
                    diff += act[..., cols] @ w_down[:, cols].t()
                    if f == 0 and down.bias is not None:
                        diff += down.bias
                    errors[a, f + 1] += diff.pow(2).sum(dtype=torch.float64)
    finally:
        hook.remove()
    rel = errors / total.clamp_min(1e-30)
    return {f"{o.a},{o.f}": float(rel[o.a, o.f]) for o in space.options()}


def arch_output(out):
    return out[0] if isinstance(out, tuple) else out
