"""GPTQ as a layer method: groups in sequential order, the walk's Hessians, RTN as the last resort."""

from __future__ import annotations

import logging

import torch

from compress.methods.base import Group, LayerMethod, register
from compress.methods.quantize.config import SEQUENTIAL_GROUPS, GPTQConfig
from compress.methods.quantize.gptq import GPTQ, CholeskyFailed, output_error
from compress.methods.quantize.grid import rtn_quantize
from compress.methods.quantize.rtn import set_quantized, weight_error
from compress.methods.quantize.targets import check_group_size, layer_targets

log = logging.getLogger(__name__)


@register
class GPTQMethod(LayerMethod):
    name = "gptq"
    help = "GPTQ weight quantization (2/3/4/8 bits, groups, sym/asym, act-order) with Hessian error feedback."
    Config = GPTQConfig

    def groups(self, layer, index):
        order = [n for group in SEQUENTIAL_GROUPS for n in group]
        names = layer_targets(layer, index, self.config.ignore, order)
        check_group_size(layer, index, names, self.config.group_size, self.name)
        if not self.config.sequential:
            return [Group(names, name="all")] if names else []
        groups = [[n for n in group if n in names] for group in SEQUENTIAL_GROUPS]
        rest = [n for n in names if n not in order]  # Linear modules outside the LLaMA names
        return [Group(g, name="+".join(g)) for g in groups + [rest] if g]

    @torch.no_grad()
    def apply(self, layer, index, group, stats):
        record = {}
        for name in group.modules:
            module = layer.get_submodule(name)
            hessian = stats[name].hessian()
            original = module.weight.detach().float().clone()
            try:
                params, info = GPTQ(original, hessian).quantize(self.config)
                fallback = None
            except CholeskyFailed as exc:
                log.warning("layer %d %s: %s; falling back to round-to-nearest", index, name, exc)
                params, info, fallback = rtn_quantize(original, self.config), {"damp": None}, "rtn"
            if not torch.isfinite(params.scale).all():  # never write NaN weights
                log.warning("layer %d %s: non-finite GPTQ grid; falling back to round-to-nearest", index, name)
                params, fallback = rtn_quantize(original, self.config), "rtn"
            quantized = set_quantized(module, params)
            record[name] = {"output_err": output_error(original, quantized.float(), hessian),
                            "weight_err": weight_error(original, quantized), "damp": info["damp"]}
            if fallback:
                record[name]["fallback"] = fallback
        return record
