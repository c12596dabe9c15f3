"""FLAP (An et al., AAAI 2024): retraining-free structured pruning by fluctuation, with bias compensation.

One walk over the *unchanged* model collects, per decoder layer, the mean and the variance over the
calibration tokens of every input feature of ``o_proj`` and ``down_proj`` (the walk's "norm"
statistics; FLAP measures on the dense model). A feature's fluctuation score is

    S_j = Var[x_j] · ‖W_:,j‖²        (WIFV: weighted input feature variance)

summed over a head's ``head_dim`` columns for attention. Scores are standardized per layer and
module kind, and one global threshold (:mod:`.allocate`) removes the lowest-scoring units of the whole
model until ``ratio`` of its projection parameters are gone, so layers lose different amounts
(FLAP's adaptive structure; ``structure: uniform`` instead removes the same fraction from every layer,
heads and channels as SlimGPT plans them, FLAP's UL-UM). Each removed input's mean contribution is added back as a bias,
b = W_:,S · E[x_S], so the mean output of o_proj / down_proj on the calibration tokens is unchanged.

Under grouped-query attention the attention units are SlimGPT's: ``query`` removes one query head
from every KV group (the k-th lowest of each group; unit score = mean of its heads' standardized
scores), ``kv`` removes a whole KV group with its query heads, keys and values.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from compress import arch
from compress.errors import CompressError, ConfigError
from compress.plugin import Group, LayerContext, LayerMethod, config_field, register
from compress.methods.flap.allocate import UnitScores, allocate, standardize
from compress.methods.slimgpt.shrink import add_bias, shrink_attention, shrink_mlp

log = logging.getLogger(__name__)
KINDS = {"attention": arch.O, "mlp": arch.DOWN}


@dataclass
class FLAPConfig:
    ratio: float = config_field(0.2, "Fraction of the decoder layers' projection parameters to remove, in (0, 1).")
    gqa_unit: str = config_field("query", "Attention unit under grouped-query attention: 'query' (one query "
                                          "head of every KV group) or 'kv' (whole KV groups).")
    bias: bool = config_field(True, "Bias compensation: add the removed inputs' mean contribution to "
                                    "o_proj / down_proj.")
    prune_attention: bool = config_field(True, "Prune attention heads (else only FFN channels).")
    structure: str = config_field("global", "global: one threshold over the standardized scores of the whole model "
                                            "(FLAP's adaptive AL-AM structure); uniform: every layer loses the same "
                                            "fraction, split between heads and channels as SlimGPT's plan (UL-UM).")

    def __post_init__(self):
        if not 0.0 < self.ratio < 1.0:
            raise ConfigError(f"field 'ratio' must be strictly between 0 and 1, got {self.ratio}")
        if self.gqa_unit not in ("query", "kv"):
            raise ConfigError(f"field 'gqa_unit' must be 'query' or 'kv', got {self.gqa_unit!r}")
        if self.structure not in ("global", "uniform"):
            raise ConfigError(f"field 'structure' must be global or uniform, got {self.structure!r}")


def fluctuation(weight: torch.Tensor, variance: torch.Tensor) -> torch.Tensor:
    """Per input column j of ``weight`` (out × in): Var[x_j] · Σ_i W_ij² (float64)."""
    return variance.double() * weight.detach().double().pow(2).sum(0)


def attention_units(head_z: torch.Tensor, kv_heads: int, unit: str) -> tuple[torch.Tensor, list[list[int]]]:
    """Attention units of one layer in ascending score order: (scores, the query heads of each unit)."""
    heads = head_z.numel()
    groups = arch.kv_groups(heads, kv_heads)
    if unit == "query" and heads // kv_heads > 1:
        ranked = [sorted(g, key=lambda h: (float(head_z[h]), h)) for g in groups]  # lowest first in every group
        members = [sorted(r[k] for r in ranked) for k in range(heads // kv_heads)]
    else:
        members = sorted(groups, key=lambda g: (float(head_z[g].mean()), g[0]))
    scores = torch.stack([head_z[m].mean() for m in members])
    return scores, members


@register
class FLAP(LayerMethod):
    name = "flap"
    help = "Structured pruning by input fluctuation, one global threshold, bias compensation (FLAP)."
    Config = FLAPConfig
    verb = "prune"
    stageable = True  # apply only reads statistics; the pruning happens in finish()

    def __init__(self, config: FLAPConfig | None = None):
        super().__init__(config)
        self.scores: dict[int, dict[str, torch.Tensor]] = {}
        self.removed: dict[tuple[int, str], int] | None = None

    def prepare(self, model: torch.nn.Module):
        lay = arch.layout(model)
        self.scores, self.removed = {}, None
        # at most all but one unit of every module can go: a larger ratio cannot be met
        most = sum(lay.parameters(i) - self._least_kept(lay, w) for i, w in enumerate(lay.layers))
        if self.config.ratio * lay.parameters() > most:
            raise CompressError(f"--ratio {self.config.ratio} would empty a layer: FLAP keeps at least one attention "
                                f"unit and one FFN channel per layer (at most {most / lay.parameters():.3f} can go)")
        return lay

    def _least_kept(self, lay, widths) -> int:
        """Parameters of a layer that keeps one attention unit and one FFN channel."""
        if not self.config.prune_attention:
            heads, kv = widths.heads, widths.kv_heads
        elif self._kv_unit(widths):
            heads, kv = widths.groups, 1
        else:
            heads, kv = widths.kv_heads, widths.kv_heads
        return arch.projection_parameters(lay.hidden, lay.head_dim, heads, kv, 1)

    def _unit_cost(self, lay, widths) -> int:
        """Parameters removed with one attention unit (q rows and o columns; k/v rows for a KV group)."""
        if self._kv_unit(widths):
            return arch.projection_parameters(lay.hidden, lay.head_dim, widths.groups, 1, 0)
        return arch.projection_parameters(lay.hidden, lay.head_dim, widths.kv_heads, 0, 0)

    def groups(self, layer, index):
        kinds = ["attention", "mlp"] if self.config.prune_attention else ["mlp"]
        return [Group([KINDS[k]], stats="norm", name=k) for k in kinds]

    def apply(self, ctx: LayerContext) -> dict:
        module = KINDS[ctx.group.name]
        stat = ctx.stats[module]
        score = fluctuation(arch.projection(ctx.layer, module).weight, stat.variance().to(ctx.device))
        if ctx.group.name == "attention":
            score = score.reshape(-1, ctx.layer.self_attn.head_dim).sum(1)  # per head
        self.scores.setdefault(ctx.index, {})[ctx.group.name] = score.cpu()
        self.scores[ctx.index][ctx.group.name + ".mean"] = stat.mean().cpu()
        return {}

    def layer_state(self, layer, index):
        return {k: v.contiguous() for k, v in self.scores.get(index, {}).items()}

    def restore(self, layer, index, record, state):
        if state:
            self.scores[index] = dict(state)

    def finish(self, model: torch.nn.Module) -> None:
        lay = arch.layout(model)
        layers = arch.decoder_layers(model)
        units, members, orders = [], {}, {}
        self._before = [lay.parameters(i) for i in range(lay.depth)]
        for index, widths in enumerate(lay.layers):
            got = self.scores.get(index)
            if got is None:
                raise CompressError(f"flap: no statistics for layer {index} (was the walk interrupted?)")
            if "attention" in got:
                z, heads = attention_units(standardize(got["attention"]), widths.kv_heads, self.config.gqa_unit)
                members[index] = heads
                units.append(UnitScores(index, "attention", z, self._unit_cost(lay, widths)))
            ranked = torch.sort(standardize(got["mlp"]), stable=True)  # channels, lowest score first
            orders[index] = ranked.indices
            units.append(UnitScores(index, "mlp", ranked.values, 3 * lay.hidden))
        if self.config.structure == "uniform":
            self.removed = self._uniform(lay)
        else:
            self.removed = allocate(units, self.config.ratio * lay.parameters())
        for index, layer in enumerate(layers):
            self._prune_layer(layer, index, lay, members.get(index), orders[index])
        log.info("flap: removed %s", {f"{k[0]}.{k[1]}": v for k, v in sorted(self.removed.items())})

    def _uniform(self, lay) -> dict[tuple[int, str], int]:
        """UL-UM: every layer loses ``ratio`` of its parameters, heads and channels as SlimGPT plans them."""
        from compress.methods.slimgpt.plan import LayerShape, plan_layer

        removed = {}
        for index, w in enumerate(lay.layers):
            shape = LayerShape(lay.hidden, w.heads, w.kv_heads, lay.head_dim, w.ffn)
            plan = plan_layer(self.config.ratio, shape, self.config.gqa_unit, self.config.prune_attention, index)
            if self.config.prune_attention:
                removed[(index, "attention")] = plan.attention_units
            removed[(index, "mlp")] = plan.channels_removed
        return removed

    def _kv_unit(self, widths) -> bool:
        return self.config.gqa_unit == "kv" or widths.groups == 1

    def _prune_layer(self, layer, index: int, lay, members, order: torch.Tensor) -> None:
        got, d = self.scores[index], lay.head_dim
        widths = lay.layers[index]
        o_proj, down = arch.projection(layer, arch.O), arch.projection(layer, arch.DOWN)
        if members is not None:
            n = self.removed[(index, "attention")]
            gone = sorted(h for unit in members[:n] for h in unit)
            kept = [h for h in range(widths.heads) if h not in set(gone)]
            kept_kv = list(range(widths.kv_heads))
            if self._kv_unit(widths):
                gone_kv = {h // widths.groups for h in gone}
                kept_kv = [g for g in kept_kv if g not in gone_kv]
            bias = self._bias(o_proj.weight, got["attention.mean"], arch.head_channels(gone, d))
            shrink_attention(layer.self_attn, o_proj.weight.detach(), kept, kept_kv, d)
            if self.config.bias:
                add_bias(arch.projection(layer, arch.O), bias)
        gone = order[:self.removed[(index, "mlp")]]
        bias = self._bias(down.weight, got["mlp.mean"], gone)
        kept = sorted(set(range(widths.ffn)) - set(gone.tolist()))
        shrink_mlp(layer.mlp, down.weight.detach(), kept)
        if self.config.bias:
            add_bias(arch.projection(layer, arch.DOWN), bias)

    @staticmethod
    def _bias(weight: torch.Tensor, mean: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
        """b = W_:,S · E[x_S]: the removed columns' mean contribution to the output."""
        columns = columns.to(weight.device)
        return weight.detach().double()[:, columns] @ mean.double().to(weight.device)[columns]

    def describe_layers(self, model: torch.nn.Module) -> list[dict] | None:
        if self.removed is None:
            return None
        lay = arch.layout(model)
        return [{"ratio": round(1 - lay.parameters(i) / self._before[i], 4), "heads": w.heads, "kv_heads": w.kv_heads,
                 "ffn": w.ffn} for i, w in enumerate(lay.layers)]
