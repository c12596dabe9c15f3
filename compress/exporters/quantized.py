"""``compressed-tensors`` and ``gptq``: quantized weights (see :mod:`compress.methods.quantize.export`).

Both read the grid each quantized Linear keeps (RTN, GPTQ), so the codes on disk are the ones the
model was evaluated with. A pruned model is written with the config that describes its per-layer
widths (:func:`compress.exporters.base.described`), as the safetensors exporter does.

:meth:`QuantizedExporter.check_plan` runs before calibration on the quantizing stages' configs
(any method config with ``bits`` and ``group_size``): one grid for the whole model (the formats have
one ``quantization_config``), groups that divide the input widths, and (gptq) codes that pack into
32-bit words. When an earlier stage may change widths (structured pruning), only the widths no such
stage changes are checked there (inputs of q/k/v/gate/up, outputs of o/down: the hidden size); the
rest is checked per layer during the walk and again, on the finished model, before saving.
"""

from __future__ import annotations

from pathlib import Path

import torch

from compress.errors import CompressError
from compress.exporters.base import Exporter, described, register_exporter

GPTQ_OPTIONS = {"act_order": False, "sequential": True, "damp": 0.01, "static_groups": True}


def _grid(method) -> tuple | None:
    """(bits, group_size, sym, ignore) of a quantizing method's config, else None."""
    config = getattr(method, "config", None)
    if config is None or not (hasattr(config, "bits") and hasattr(config, "group_size")):
        return None
    return config.bits, config.group_size, getattr(config, "sym", True), list(getattr(config, "ignore", []) or [])


class QuantizedExporter(Exporter):
    kind = "quantized"

    def holds(self, model: torch.nn.Module) -> bool:
        from compress.methods.quantize.export import quantized_linears

        return bool(quantized_linears(model))

    def check_plan(self, model, methods, options=None) -> None:
        from compress import arch
        from compress.methods.quantize.export import check_shape
        from compress.methods.quantize.targets import is_ignored

        self.check_options(options)
        methods = list(methods)
        grids = [(i, g) for i, m in enumerate(methods) if (g := _grid(m)) is not None]
        if not grids:
            return  # choose_format tells that nothing quantizes
        kinds = sorted({g[:3] for _, g in grids})
        if len(kinds) > 1:
            raise CompressError(f"export format '{self.name}' writes one quantization grid, but the stages use "
                                f"{len(kinds)} different (bits, group_size, sym): {kinds}")
        first = grids[0][0]
        reshaping = any(_grid(m) is None for m in methods[:first])  # may change widths before quantizing
        bits, group_size, _, ignore = grids[0][1]
        for index, layer in enumerate(arch.decoder_layers(model)):
            for name, module in layer.named_modules():
                if not isinstance(module, torch.nn.Linear) or is_ignored(arch.module_name(index, name), ignore):
                    continue
                out, width = module.weight.shape
                if reshaping:  # only the hidden-size sides are known now
                    width = width if name in arch.READS_HIDDEN else None
                    out = out if name in arch.WRITES_HIDDEN else None
                check_shape(arch.module_name(index, name), out, width, bits, group_size, self.name)

    def output_bytes(self, model, options: dict) -> int:
        """The float tensors, with each quantized Linear's weight at its bit width (plus its scales)."""
        from compress.export import tensor_bytes
        from compress.methods.quantize.export import quantized_linears

        total = tensor_bytes(model)
        for linear, params in quantized_linears(model).values():
            weight = linear.weight
            total -= weight.numel() * weight.element_size() - weight.numel() * params.bits // 8
        return max(total, 0)

    def check_model(self, model) -> None:
        from compress.methods.quantize.export import check_exportable, quantized_linears, single_grid

        super().check_model(model)
        quantized = quantized_linears(model)
        params = single_grid(quantized)
        check_exportable(model, list(quantized), params.bits, params.group_size, self.name)


@register_exporter
class CompressedTensorsExporter(QuantizedExporter):
    name = "compressed-tensors"
    auto_priority = 10
    help = ("compressed-tensors pack-quantized (symmetric) / naive-quantized (asymmetric); "
            "transformers and vLLM load it.")

    def write(self, model, tokenizer, folder: Path, options: dict, record: dict) -> None:
        from compress.methods.quantize.export import write_compressed_tensors

        with described(model) as extra:
            write_compressed_tensors(model, tokenizer, folder)
            for name, text in extra.items():
                (folder / name).write_text(text)


@register_exporter
class GPTQExporter(QuantizedExporter):
    name = "gptq"
    help = "GPTQ v1 layout (qweight, qzeros, scales, g_idx) and quantize_config.json, for GPTQModel/vLLM."
    option_defaults = GPTQ_OPTIONS

    def options(self, methods) -> dict:
        """act_order / sequential / damp / static_groups from the last stage whose config has each."""
        return _options([getattr(m, "config", None) for m in methods])

    def save(self, model, tokenizer, out, record, *, source=None, force=False, extra_files=None, options=None):
        if options is None:  # as the stages recorded them (compress.json "stages": [{"config": ...}])
            options = _options([stage.get("config") for stage in record.get("stages", []) or []])
        return super().save(model, tokenizer, out, record, source=source, force=force, extra_files=extra_files,
                            options=options)

    def write(self, model, tokenizer, folder: Path, options: dict, record: dict) -> None:
        from compress.methods.quantize.export import write_gptq

        with described(model) as extra:
            write_gptq(model, tokenizer, folder, **options)
            for name, text in extra.items():
                (folder / name).write_text(text)


def _options(configs) -> dict:
    options = {}
    for config in configs:
        for key in GPTQ_OPTIONS:
            if isinstance(config, dict) and key in config:
                options[key] = config[key]
            elif config is not None and not isinstance(config, dict) and hasattr(config, key):
                options[key] = getattr(config, key)
    return options
