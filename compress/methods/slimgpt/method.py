"""SlimGPT as a layer-wise method of the walk.

Per decoder layer the walk runs two groups in order:

1. ``self_attn.o_proj``: collect H of o_proj's input, remove query heads (or KV groups) by Batched
   Greedy Pruning with OBS compensation of the surviving o_proj columns, drop their q/k/v rows;
2. ``mlp.down_proj``: the walk re-runs the layer *with the pruned attention*, so H of down_proj's
   input is the one the pruned model really sees (as the paper does); remove FFN channels by
   Dynamic Group Size with compensation, drop their gate/up rows.

Then the walk propagates the pruned layer's outputs to the next layer. Call :meth:`prepare` with the
model before the walk: it computes every layer's plan (Incremental Pruning Ratio) and fails fast.
"""

from __future__ import annotations

import logging
import time

import torch

from compress.errors import CompressError
from compress.models import decoder_layers
from compress.plugin import Group, LayerContext, LayerMethod, register
from compress.methods.slimgpt.config import SlimGPTConfig
from compress.methods.slimgpt.obs import dynamic_group_sizes, prune_channels, prune_column_groups
from compress.methods.slimgpt.plan import LayerPlan, LayerShape, plan_model
from compress.methods.slimgpt.shrink import (add_bias, head_channels, layer_widths,  # noqa: F401
                                             refresh_attributes, shrink_attention, shrink_mlp)

log = logging.getLogger(__name__)
ATTENTION = "self_attn.o_proj"
MLP = "mlp.down_proj"


def model_shapes(model: torch.nn.Module) -> list[LayerShape]:
    """The widths of every decoder layer as the modules are now (works on pruned models too)."""
    from compress.arch import layout

    lay = layout(model)
    return [LayerShape(lay.hidden, w.heads, w.kv_heads, lay.head_dim, w.ffn) for w in lay.layers]


@register
class SlimGPT(LayerMethod):
    name = "slimgpt"
    help = "Structured pruning of attention heads and FFN channels (SlimGPT, OBS with compensation)."
    Config = SlimGPTConfig
    verb = "prune"

    def __init__(self, config: SlimGPTConfig | None = None):
        super().__init__(config)
        self.shapes: list[LayerShape] | None = None
        self.plans: list[LayerPlan] | None = None

    def prepare(self, model: torch.nn.Module) -> list[LayerPlan]:
        """Plan every layer from the model's widths; raises CompressError if a layer would be emptied."""
        self.shapes = model_shapes(model)
        if self.config.schedule == "global":  # planned by the prepass (OBSProfile.finish); check it can be met
            uniform = plan_model(self.shapes, self.config.ratio, "uniform", self.config.min_scale,
                                 self.config.gqa_unit, self.config.prune_attention, self.config.ffn_multiple)
            self.plans = None
            return uniform
        self.plans = plan_model(self.shapes, self.config.ratio, self.config.schedule, self.config.min_scale,
                                self.config.gqa_unit, self.config.prune_attention,
                                self.config.ffn_multiple)
        return self.plans

    def prepass(self):
        """The global schedule scores every layer's units on the unchanged model first."""
        if self.config.schedule != "global":
            return None
        from compress.methods.slimgpt.profile import OBSProfile

        return OBSProfile(self)

    def describe_layers(self, model: torch.nn.Module) -> list[dict] | None:
        if self.plans is None:
            return None
        return [{"ratio": round(plan.ratio, 4), "heads": shape.heads, "kv_heads": shape.kv_heads, "ffn": shape.ffn}
                for plan, shape in zip(self.plans, model_shapes(model))]

    def _plan(self, index: int) -> LayerPlan:
        if self.plans is None:
            raise CompressError("slimgpt: call prepare(model) before the walk (it plans every layer's ratio)")
        return self.plans[index]

    def groups(self, layer: torch.nn.Module, index: int) -> list[Group]:
        plan = self._plan(index)
        groups = []
        if plan.attention_units:
            groups.append(Group([ATTENTION], name="attention"))
        if plan.channels_removed:
            groups.append(Group([MLP], name="mlp"))
        return groups

    def restore(self, layer, index, record, state):
        """On resume: the loaded tensors have the pruned widths; the attributes derived from them
        (``num_key_value_groups``, ``intermediate_size``) are set again from the modules."""
        dim = self.shapes[index].head_dim if self.shapes else layer.self_attn.head_dim
        try:
            refresh_attributes(layer, dim)
        except ValueError as exc:
            raise CompressError(f"resume state: layer {index} does not have the widths of a pruned layer ({exc}); "
                                "remove the folder to start over") from None

    @property
    def _dtype(self) -> torch.dtype:
        return torch.float64 if self.config.obs_dtype == "float64" else torch.float32

    stageable = True  # it cuts only o_proj's / down_proj's inputs (and their producers), reported below

    def kept_inputs(self) -> dict[str, torch.Tensor] | None:
        kept, self._kept = getattr(self, "_kept", None), None
        return kept

    def apply(self, ctx: LayerContext) -> dict:
        layer, index, group, stats = ctx.layer, ctx.index, ctx.group, ctx.stats
        start = time.perf_counter()
        plan, shape = self._plan(index), self.shapes[index]
        stat = stats[ATTENTION if group.name == "attention" else MLP]
        # with ``bias``: OBS on the centred inputs, then the bias that restores the mean output
        hessian = stat.centered_hessian() if self.config.bias else stat.hessian()
        mean = stat.mean() if self.config.bias else None
        if group.name == "attention":
            out = self._prune_attention(layer, plan, shape, hessian, mean)
        else:
            out = self._prune_mlp(layer, plan, hessian, mean)
        out[f"{group.name}_seconds"] = round(time.perf_counter() - start, 3)
        log.info("layer %d %s: %s", index, group.name,
                 {k: v for k, v in out.items() if k in ("heads_kept", "kv_heads_kept", "ffn_kept")})
        return out

    def finish(self, model: torch.nn.Module) -> None:
        """With ``bias``, every o_proj / down_proj gets one (zeros where a layer lost nothing), so that one
        config flag describes the checkpoint."""
        if self.config.bias:
            for layer in decoder_layers(model):
                for linear in (layer.self_attn.o_proj, layer.mlp.down_proj):
                    if linear.bias is None:
                        add_bias(linear, torch.zeros(linear.out_features))

    @staticmethod
    def _mean_bias(linear, new_weight: torch.Tensor, mean: torch.Tensor | None) -> None:
        """b += (W − Ŵ) E[x]: the output's mean on the calibration tokens is what it was (Ŵ has the
        removed columns at zero)."""
        if mean is not None:
            delta = linear.weight.detach().double() - new_weight.double().to(linear.weight.device)
            add_bias(linear, delta @ mean.double().to(linear.weight.device))

    def _prune_attention(self, layer, plan: LayerPlan, shape: LayerShape, hessian: torch.Tensor,
                         mean: torch.Tensor | None = None) -> dict:
        attn = layer.self_attn
        groups = shape.heads // shape.kv_heads
        weight = attn.o_proj.weight
        if plan.unit == "query":
            # one OBS group per query head; every KV group must lose the same number of heads
            partition = [[g * groups + j for j in range(groups)] for g in range(shape.kv_heads)]
            result = prune_column_groups(weight, hessian, shape.head_dim, plan.heads_removed,
                                         damping=self.config.damping, partition=partition, dtype=self._dtype)
            kept_heads, kept_kv = result.kept, list(range(shape.kv_heads))
        else:
            # one OBS group per KV head: its query heads' columns are consecutive in o_proj's input
            result = prune_column_groups(weight, hessian, groups * shape.head_dim, plan.kv_removed,
                                         damping=self.config.damping, dtype=self._dtype)
            kept_kv = result.kept
            kept_heads = [g * groups + j for g in kept_kv for j in range(groups)]
        self._mean_bias(attn.o_proj, result.weight, mean)
        shrink_attention(attn, result.weight.to(weight.dtype), kept_heads, kept_kv, shape.head_dim)
        self._kept = {ATTENTION: head_channels(kept_heads, shape.head_dim, torch.device("cpu"))}
        return {"heads_kept": len(kept_heads), "kv_heads_kept": len(kept_kv), "removed_units": result.removed,
                "attention_error": result.total_error}

    def _prune_mlp(self, layer, plan: LayerPlan, hessian: torch.Tensor, mean: torch.Tensor | None = None) -> dict:
        mlp = layer.mlp
        sizes = dynamic_group_sizes(plan.channels_removed, self.config.ffn_first_cap, self.config.ffn_batch)
        weight = mlp.down_proj.weight
        result = prune_channels(weight, hessian, plan.channels_removed, damping=self.config.damping,
                                batch_sizes=sizes, dtype=self._dtype)
        self._mean_bias(mlp.down_proj, result.weight, mean)
        shrink_mlp(mlp, result.weight.to(weight.dtype), result.kept)
        self._kept = {MLP: torch.tensor(result.kept, dtype=torch.long)}
        return {"ffn_kept": len(result.kept), "ffn_batches": sizes, "mlp_error": result.total_error}
