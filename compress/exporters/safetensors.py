"""``safetensors``: a plain Hugging Face checkpoint that stock transformers loads.

Untouched widths keep the model's own config; pruned layers of one width get a plain ``LlamaConfig``;
per-layer widths get a ``compress_llama`` config with ``modeling_compress_llama.py`` beside it
(``from_pretrained(..., trust_remote_code=True)`` or :func:`compress.load` reload it). Dropped layers
are simply absent: the config says the present depth and, for provenance, which parent layers they were.
"""

from __future__ import annotations

from pathlib import Path

import torch

from compress.exporters.base import Exporter, described, register_exporter


def is_quantized(model: torch.nn.Module) -> bool:
    """Quantized Linears in memory (RTN/GPTQ keep their grid) or a quantized checkpoint's config."""
    from compress.methods.quantize.export import quantized_linears

    config = getattr(model, "config", None)
    return bool(quantized_linears(model)) or getattr(config, "quantization_config", None) is not None


@register_exporter
class SafetensorsExporter(Exporter):
    name = "safetensors"
    kind = "float"
    auto_priority = 1  # the fallback: any float model
    help = "Plain Hugging Face checkpoint (per-layer widths / dropped layers: compress_llama config + modeling file)."

    def holds(self, model: torch.nn.Module) -> bool:
        return not is_quantized(model)

    def write(self, model, tokenizer, folder: Path, options: dict, record: dict) -> None:
        with described(model) as extra:
            model.save_pretrained(folder, safe_serialization=True)
            for name, text in extra.items():
                (folder / name).write_text(text)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
