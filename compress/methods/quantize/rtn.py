"""Round-to-nearest weight quantization as a layer method (no calibration statistics needed)."""

from __future__ import annotations

import torch

from compress.plugin import Group, LayerMethod, register
from compress.methods.quantize.config import RTNConfig
from compress.methods.quantize.grid import QuantParams, rtn_quantize
from compress.methods.quantize.targets import check_group_size, check_quantizable, layer_targets


def set_quantized(module: torch.nn.Linear, params: QuantParams) -> torch.Tensor:
    """Replace the module's weight by its dequantized grid values and keep the grid for export."""
    quantized = params.dequantize().to(module.weight.dtype)
    module.weight.data.copy_(quantized)
    module.quant_params = params  # read by compress.methods.quantize.export
    return quantized


def weight_error(original: torch.Tensor, quantized: torch.Tensor) -> float:
    """‖W − Ŵ‖² / ‖W‖²."""
    original = original.double()
    return ((quantized.double() - original).pow(2).sum() / original.pow(2).sum().clamp_min(1e-30)).item()


@register
class RTN(LayerMethod):
    name = "rtn"
    help = "Round-to-nearest integer weight quantization (2/3/4/8 bits, groups, sym/asym)."
    Config = RTNConfig
    stageable = True
    needs_data = False
    verb = "quantize"
    output_format = "compressed-tensors"  # quantized weights (gptq writes them too)

    def prepare(self, model):
        check_quantizable(model, self.config.ignore)

    def groups(self, layer, index):
        names = layer_targets(layer, index, self.config.ignore)
        check_group_size(layer, index, names, self.config.group_size, self.name)
        return [Group(names, stats="none", name="rtn")] if names else []

    @torch.no_grad()
    def apply(self, ctx):
        record = {}
        for name in ctx.group.modules:
            module = ctx.layer.get_submodule(name)
            original = module.weight.detach().float().clone()
            params = rtn_quantize(original, self.config)
            quantized = set_quantized(module, params)
            record[name] = {"weight_err": weight_error(original, quantized)}
        return record
