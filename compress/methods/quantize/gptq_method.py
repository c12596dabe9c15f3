"""GPTQ as a layer method: groups in sequential order, the walk's Hessians, RTN as the last resort."""

from __future__ import annotations

import logging

import torch

from compress.methods.quantize.config import SEQUENTIAL_GROUPS, GPTQConfig
from compress.methods.quantize.gptq import GPTQ, CholeskyFailed, output_error
from compress.methods.quantize.grid import rtn_quantize
from compress.methods.quantize.rtn import QuantizeMethod, set_quantized, weight_error
from compress.methods.quantize.targets import check_group_size, layer_targets
from compress.plugin import Group, register

log = logging.getLogger(__name__)


@register
class GPTQMethod(QuantizeMethod):
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
    def apply(self, ctx):
        """Quantize the group's modules; modules that share one accumulator (q/k/v, gate/up: the same
        input) are quantized as one stacked matrix, which gives each row exactly what it would get alone
        (GPTQ treats rows independently given H) with one Cholesky and one column loop."""
        layer, index, group, stats = ctx.layer, ctx.index, ctx.group, ctx.stats
        record = {}
        clusters: dict[int, list[str]] = {}
        for name in group.modules:
            clusters.setdefault(id(stats[name]), []).append(name)
        for names in clusters.values():
            modules = [layer.get_submodule(n) for n in names]
            hessian = stats[names[0]].hessian()
            original = torch.cat([m.weight.detach().float() for m in modules])  # (Σ out, in)
            label = "+".join(names)
            try:
                params, info = GPTQ(original, hessian).quantize(self.config)
                fallback = None
            except CholeskyFailed as exc:
                log.warning("layer %d %s: %s; falling back to round-to-nearest", index, label, exc)
                params, info, fallback = rtn_quantize(original, self.config), {"damp": None}, "rtn"
            if not torch.isfinite(params.scale).all():  # never write NaN weights
                log.warning("layer %d %s: non-finite GPTQ grid; falling back to round-to-nearest", index, label)
                params, fallback = rtn_quantize(original, self.config), "rtn"
            start = 0
            for name, module in zip(names, modules):
                stop = start + module.out_features
                weight = original[start:stop]
                quantized = set_quantized(module, params.rows(start, stop))
                record[name] = {"output_err": output_error(weight, quantized.float(), hessian),
                                "weight_err": weight_error(weight, quantized), "damp": info["damp"]}
                if fallback:
                    record[name]["fallback"] = fallback
                start = stop
        return record
