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

With OBS-compensated candidates (:mod:`compress.search.compensation`) the walk also keeps the o_proj and
down_proj input Gram matrices, turns them into the per-layer factors, and lowers each option's score by
what the update removes from the o_proj and down_proj outputs' error (computed exactly per projection;
their interaction through the MLP is taken as the slice's), clamped at 0.
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

    def __init__(self, space: SearchSpace, candidates: str = "slice", orders: dict | None = None):
        super().__init__(config={})
        self.space = space
        self.compensated = candidates == "obs"
        # given the recorded orders (a resumed search, an export): factors only, no scores
        self.with_scores = orders is None
        self.heads: dict[int, list[int]] = dict(orders["heads"]) if orders else {}
        self.channels: dict[int, list[int]] = dict(orders["channels"]) if orders else {}
        self.scores: dict[int, dict[str, float]] = {}
        self.factors: dict[int, dict] = {}  # layer → compensation factors (OBS candidates)
        self._o_xtx: dict[int, torch.Tensor] = {}

    def groups(self, layer, index):
        stats = "hessian" if self.compensated else "norm"
        return [Group([ATTENTION], stats=stats, name="attention"), Group([MLP], stats=stats, name="mlp")]

    def compensation(self):
        from compress.search.compensation import Compensation

        return Compensation(self.space, self.factors) if self.compensated else None

    def apply(self, ctx: LayerContext):
        layer = ctx.layer
        name = ctx.group.modules[0]
        norms = ctx.stats[name].channel_norms()
        weight = arch.projection(layer, name).weight
        i = ctx.index
        if ctx.group.name == "attention":
            if self.with_scores:
                self.heads[i] = head_order(column_scores(norms, weight), self.space)
            if self.compensated:
                self._o_xtx[i] = ctx.stats[name].xtx.cpu()
            return {}
        if self.with_scores:
            self.channels[i] = channel_order(column_scores(norms, weight))
        gains = None
        if self.compensated:
            from compress.search.compensation import layer_factors

            self.factors[i], gains = layer_factors(self.space, self._o_xtx.pop(i), ctx.stats[name].xtx,
                                                   self.heads[i], self.channels[i],
                                                   layer if self.with_scores else None)
        if self.with_scores:
            self.scores[i] = option_scores(layer, ctx, self.space, self.heads[i], self.channels[i], gains)
        return {}


@torch.no_grad()
def option_scores(layer: nn.Module, ctx: LayerContext, space: SearchSpace, heads: list[int],
                  channels: list[int], gains: tuple[list[float], list[float]] | None = None) -> dict[str, float]:
    """Relative output error of every option of this layer (keys "a,f"), see the module docstring;
    ``gains`` (per attention width, per FFN width) are subtracted from the kept layers' errors."""
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
    if gains is not None:
        g_o, g_d = (torch.tensor(g, dtype=torch.float64) for g in gains)
        # no width kept (a = 0 or f = 0, the dropped layer among them) gains nothing: g_o[0] = g_d[0] = 0
        errors = (errors - g_o[:, None] - g_d[None, :]).clamp_min(0)
    rel = errors / total.clamp_min(1e-30)
    return {f"{o.a},{o.f}": float(rel[o.a, o.f]) for o in space.options()}


def arch_output(out):
    return out[0] if isinstance(out, tuple) else out
