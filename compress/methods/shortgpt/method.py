"""ShortGPT (Men et al., 2024): remove whole decoder layers ranked by Block Influence.

One walk over the unchanged model gives every layer its input X and output Y on the calibration
tokens; its Block Influence is

    BI = 1 − E_tokens[ cos(x_t, y_t) ]

(a layer that barely turns the residual stream has low influence). The ``layers`` least influential
layers are removed; with ``ratio`` instead, the fewest whole layers, lowest BI first, that remove at
least that fraction of the decoder layers' projection parameters. The result is a shallower model
of the stock architecture (a plain Llama config when the widths are uniform), with the parent index
of every kept layer recorded in its config.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from compress import arch
from compress.errors import CompressError, ConfigError
from compress.plugin import Group, LayerContext, LayerMethod, config_field, register

log = logging.getLogger(__name__)


@dataclass
class ShortGPTConfig:
    ratio: float | None = config_field(None, "Fraction of the decoder layers' projection parameters to remove, "
                                             "in (0, 1): the fewest whole layers that reach it.")
    layers: int | None = config_field(None, "Number of decoder layers to remove (instead of --ratio).")

    def __post_init__(self):
        if (self.ratio is None) == (self.layers is None):
            raise ConfigError("give exactly one of 'ratio' and 'layers'")
        if self.ratio is not None and not 0.0 < self.ratio < 1.0:
            raise ConfigError(f"field 'ratio' must be strictly between 0 and 1, got {self.ratio}")
        if self.layers is not None and self.layers < 1:
            raise ConfigError(f"field 'layers' must be a positive integer, got {self.layers}")


@torch.no_grad()
def block_influence(inputs: list[torch.Tensor], outputs: list[torch.Tensor]) -> float:
    """1 − mean over every token of cos(input, output) (float64 accumulation)."""
    total, count = 0.0, 0
    for x, y in zip(inputs, outputs):
        cos = torch.nn.functional.cosine_similarity(x.double().flatten(0, -2), y.double().flatten(0, -2), dim=-1)
        total += float(cos.sum())
        count += cos.numel()
    return 1.0 - total / max(count, 1)


@register
class ShortGPT(LayerMethod):
    name = "shortgpt"
    help = "Depth pruning: remove the decoder layers of lowest Block Influence (ShortGPT)."
    Config = ShortGPTConfig
    verb = "prune"
    needs_inputs = True
    teacher_forced = True  # the layer is unchanged during the walk: its outputs are the next inputs

    def __init__(self, config: ShortGPTConfig | None = None):
        super().__init__(config)
        self.influence: dict[int, float] = {}
        self.dropped: list[int] | None = None

    def prepare(self, model: torch.nn.Module):
        lay = arch.layout(model)
        self.influence, self.dropped = {}, None
        if self.config.layers is not None and self.config.layers >= lay.depth:
            raise CompressError(f"--layers {self.config.layers} must be less than the model's depth ({lay.depth} "
                                "decoder layers)")
        if self.config.ratio is not None:
            smallest = sorted(lay.parameters(i) for i in range(lay.depth))
            # even the largest layers, removed first, must leave one layer
            if sum(smallest[1:]) < self.config.ratio * lay.parameters():
                raise CompressError(f"--ratio {self.config.ratio} would remove every decoder layer")
        return lay

    def groups(self, layer, index):
        return [Group([], stats="none", name="influence")]

    def apply(self, ctx: LayerContext) -> dict:
        self.influence[ctx.index] = block_influence(ctx.inputs, ctx.teacher_outputs)
        return {"block_influence": round(self.influence[ctx.index], 6)}

    def restore(self, layer, index, record, state):
        value = (record.get(self.name) or {}).get("block_influence")
        if value is None:
            raise CompressError(f"resume state: layer {index} has no block influence; remove the folder to start over")
        self.influence[index] = float(value)

    def choose(self, lay: arch.Layout) -> list[int]:
        """The layers to remove: the ``layers`` lowest BI, or the fewest (lowest BI first) reaching ``ratio``."""
        order = sorted(range(lay.depth), key=lambda i: (self.influence[i], i))
        if self.config.layers is not None:
            return sorted(order[:self.config.layers])
        target, removed, chosen = self.config.ratio * lay.parameters(), 0, []
        for i in order:
            if removed >= target:
                break
            chosen.append(i)
            removed += lay.parameters(i)
        if len(chosen) >= lay.depth:
            raise CompressError(f"--ratio {self.config.ratio} would remove every decoder layer")
        return sorted(chosen)

    def finish(self, model: torch.nn.Module) -> None:
        lay = arch.layout(model)
        missing = [i for i in range(lay.depth) if i not in self.influence]
        if missing:
            raise CompressError(f"shortgpt: no block influence for layer {missing[0]} (was the walk interrupted?)")
        chosen = self.choose(lay)
        self.dropped = [lay.kept_layers[i] for i in chosen]
        arch.drop_layers(model, chosen)
        log.info("shortgpt: removed layers %s", self.dropped)

    def summary(self) -> dict:
        return {"dropped_layers": self.dropped, "block_influence": [round(self.influence[i], 6)
                                                                    for i in sorted(self.influence)]}

    def describe_layers(self, model: torch.nn.Module) -> list[dict] | None:
        if self.dropped is None:
            return None
        lay = arch.layout(model)
        return [{"ratio": 0.0, "heads": w.heads, "kv_heads": w.kv_heads, "ffn": w.ffn, "parent": p}
                for w, p in zip(lay.layers, lay.kept_layers)]
