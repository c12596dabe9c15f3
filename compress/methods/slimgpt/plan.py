"""How much of every decoder layer to remove: the per-layer ratio turned into heads and channels.

A layer's prunable parameters are P = hidden · head_dim · (2·heads + 2·kv_heads) + 3 · hidden · ffn
(q, k, v, o and gate, up, down; Llama has no biases). Layer i must lose r_i · P of them. Attention is
pruned in whole units — under grouped-query attention either one query head from every KV group
("query": q rows and o columns) or one whole KV group ("kv": its query heads plus its k and v rows);
without GQA a unit is one head with its key and value. The attention loses round(r_i · units) units
(SlimGPT prunes heads and channels at the same ratio) and the FFN takes the rest, to the channel,
so every layer meets its ratio up to one channel whatever the head granularity (up to half of
``ffn_multiple`` channels when the kept FFN width is rounded to a multiple of it, so that a later
quantization group size divides it).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from compress.arch import projection_parameters
from compress.errors import CompressError
from compress.methods.slimgpt.schedule import layer_ratios


@dataclass
class LayerShape:
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int

    @property
    def prunable(self) -> int:
        return self.cost(self.heads, self.kv_heads, self.ffn)

    def cost(self, heads: int = 0, kv_heads: int = 0, channels: int = 0) -> int:
        """Projection weights of so many query heads, KV heads and FFN channels of this layer."""
        return projection_parameters(self.hidden, self.head_dim, heads, kv_heads, channels)


@dataclass
class LayerPlan:
    ratio: float  # the schedule's target for this layer
    unit: str  # "query" or "kv"
    attention_units: int  # units removed (see module docstring)
    heads_removed: int
    kv_removed: int
    channels_removed: int

    def as_dict(self) -> dict:
        return asdict(self)


def plan_layer(ratio: float, shape: LayerShape, unit: str, prune_attention: bool = True, index: int = 0,
               ffn_multiple: int = 1) -> LayerPlan:
    groups = shape.heads // shape.kv_heads  # query heads per KV head
    if groups == 1:
        unit = "kv"  # no GQA: a head goes with its own key and value
    if unit == "query":  # one query head of every KV group
        total_units, unit_cost = groups, shape.cost(heads=shape.kv_heads)
    else:  # one KV head with its query heads
        total_units, unit_cost = shape.kv_heads, shape.cost(heads=groups, kv_heads=1)
    target = ratio * shape.prunable
    units = min(round(ratio * total_units), total_units - 1) if prune_attention else 0
    channel_cost = shape.cost(channels=1)
    channels = round((target - units * unit_cost) / channel_cost)
    while channels < 0 and units > 0:  # attention rounding overshot the layer's budget
        units -= 1
        channels = round((target - units * unit_cost) / channel_cost)
    channels = max(channels, 0)
    if ffn_multiple > 1:  # keep a multiple of ffn_multiple channels (e.g. a quantization group size)
        kept = min(max(round((shape.ffn - channels) / ffn_multiple), 1) * ffn_multiple,
                   shape.ffn // ffn_multiple * ffn_multiple)
        channels = shape.ffn - kept
    if ratio >= 1.0 or channels >= shape.ffn:
        raise CompressError(f"layer {index} would be emptied: its pruning ratio is {ratio:.3f} "
                            f"(after its attention heads it would need to lose {channels} of its {shape.ffn} FFN channels); "
                            "choose a lower --ratio, --schedule uniform or a larger min_scale")
    if unit == "query":
        heads_removed, kv_removed = units * shape.kv_heads, 0
    else:
        heads_removed, kv_removed = units * groups, units
    return LayerPlan(ratio, unit, units, heads_removed, kv_removed, channels)


def plan_model(shapes: list[LayerShape], target: float, schedule: str, min_scale: float, unit: str,
               prune_attention: bool = True, ffn_multiple: int = 1) -> list[LayerPlan]:
    """Per-layer plans whose ratios have the parameter-weighted mean ``target``; raises before any work
    when a layer would be emptied."""
    ratios = layer_ratios(target, [s.prunable for s in shapes], schedule, min_scale)
    return [plan_layer(r, s, unit, prune_attention, i, ffn_multiple) for i, (r, s) in enumerate(zip(ratios, shapes))]


def removed_parameters(shape: LayerShape, plan: LayerPlan) -> int:
    return shape.cost(plan.heads_removed, plan.kv_removed, plan.channels_removed)
