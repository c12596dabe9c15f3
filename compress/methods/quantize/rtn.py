"""Round-to-nearest weight quantization as a layer method (no calibration statistics needed)."""

from __future__ import annotations

import torch

from compress.errors import CompressError
from compress.plugin import Group, LayerMethod, register
from compress.methods.quantize.config import RTNConfig
from compress.methods.quantize.grid import QuantParams, rtn_quantize
from compress.methods.quantize.targets import check_group_size, check_quantizable, layer_targets, resolve_group_size


def set_quantized(module: torch.nn.Linear, params: QuantParams) -> torch.Tensor:
    """Replace the module's weight by its dequantized grid values and keep the grid for export."""
    quantized = params.dequantize().to(module.weight.dtype)
    module.weight.data.copy_(quantized)
    module.quant_params = params  # read by compress.methods.quantize.export
    return quantized


GRID_TENSORS = ("codes", "scale", "zero", "g_idx")  # the QuantParams fields that are tensors
GRID_SETTINGS = "grid"  # key suffix of (bits, group_size, sym) as one int64 tensor


def grid_state(layer: torch.nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """The grids (``quant_params``) that the named Linear modules of ``layer`` keep, as tensors:
    ``<module>.codes|scale|zero|g_idx`` and ``<module>.grid`` = (bits, group_size, sym)."""
    state = {}
    for name in names:
        params = getattr(layer.get_submodule(name), "quant_params", None)
        if params is None:
            continue
        for field in GRID_TENSORS:
            state[f"{name}.{field}"] = getattr(params, field)
        state[f"{name}.{GRID_SETTINGS}"] = torch.tensor([params.bits, params.group_size, int(params.sym)],
                                                        dtype=torch.int64)
    return state


def restore_grids(layer: torch.nn.Module, index: int, names, state: dict[str, torch.Tensor], method: str) -> None:
    """Put back the grids :func:`grid_state` saved for the named modules (those ``method`` quantized)."""
    from compress.arch import module_name

    for name in names:
        where = module_name(index, name)
        keys = [f"{name}.{field}" for field in (*GRID_TENSORS, GRID_SETTINGS)]
        if not all(key in state for key in keys):
            raise CompressError(f"resume state: the quantization grid of {where} ({method}) was not saved with the "
                                "layer (a state folder from an older version?); remove the folder to start over")
        module = layer.get_submodule(name)
        codes, scale, zero, g_idx, settings = (state[key] for key in keys)
        bits, group_size, sym = (int(v) for v in settings.tolist())
        if tuple(codes.shape) != tuple(module.weight.shape) or g_idx.numel() != codes.shape[1]:
            raise CompressError(f"resume state: the saved grid of {where} ({tuple(codes.shape)}) does not fit its "
                                f"weight {tuple(module.weight.shape)}; remove the folder to start over")
        module.quant_params = QuantParams(codes.to(torch.uint8), scale.float(), zero.to(torch.int32),
                                          g_idx.to(torch.int32), bits, group_size, bool(sym))


def weight_error(original: torch.Tensor, quantized: torch.Tensor) -> float:
    """‖W − Ŵ‖² / ‖W‖²."""
    original = original.double()
    return ((quantized.double() - original).pow(2).sum() / original.pow(2).sum().clamp_min(1e-30)).item()


class QuantizeMethod(LayerMethod):
    """What RTN and GPTQ share: the verb and exporter, the data-free checks and the automatic group size
    (``prepare``), and the grids kept across a resumed walk (``layer_state`` / ``restore``)."""

    stageable = True
    verb = "quantize"
    output_format = "compressed-tensors"  # quantized weights (gptq writes them too)

    def prepare(self, model):
        check_quantizable(model, self.config.ignore)
        self.group_size_note = resolve_group_size(model, self.config)

    def layer_state(self, layer, index):
        """The grids of the layer's quantized modules, saved with the layer by a resumable walk."""
        return grid_state(layer, layer_targets(layer, index, self.config.ignore))

    def restore(self, layer, index, record, state):
        """On resume: the grids of the modules this method quantized in the layer (its record names them)."""
        restore_grids(layer, index, list(record.get(self.name, {})), state, self.name)


@register
class RTN(QuantizeMethod):
    name = "rtn"
    help = "Round-to-nearest integer weight quantization (2/3/4/8 bits, groups, sym/asym)."
    Config = RTNConfig
    needs_data = False

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
