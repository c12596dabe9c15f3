"""Python API: prune an in-memory model with SlimGPT and save it as a stock or per-layer checkpoint."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from compress.export import save_model
from compress.methods.base import make_config
from compress.methods.slimgpt.config import SlimGPTConfig
from compress.methods.slimgpt.method import SlimGPT, model_shapes
from compress.models import check_llama_like
from compress.modeling_pruned import FILE_NAME, modeling_source, per_layer_config


@dataclass
class PruneSummary:
    parameters_before: int
    parameters_after: int
    decoder_parameters_before: int
    decoder_parameters_after: int
    layers: list[dict] = field(default_factory=list)  # per layer: ratio, heads, kv_heads, ffn
    seconds: float = 0.0

    @property
    def decoder_removed_fraction(self) -> float:
        return 1.0 - self.decoder_parameters_after / self.decoder_parameters_before


def _unique_parameters(module: torch.nn.Module) -> int:
    seen, total = set(), 0
    for p in module.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel()
    return total


def make_slimgpt(options: dict | SlimGPTConfig) -> SlimGPT:
    config = options if isinstance(options, SlimGPTConfig) else make_config(SlimGPTConfig, options, "method slimgpt")
    return SlimGPT(config)


def prepare(model: torch.nn.Module, options: dict | SlimGPTConfig) -> SlimGPT:
    """Check the model and plan every layer (fails fast, before any calibration work)."""
    check_llama_like(model)
    method = make_slimgpt(options)
    method.prepare(model)
    return method


def prune(model: torch.nn.Module, tokens: torch.Tensor, options: dict | SlimGPTConfig | SlimGPT, *,
          device: str | torch.device = "auto", batch_size: int = 8,
          state_dir: str | os.PathLike | None = None) -> tuple[PruneSummary, list[dict]]:
    """Prune ``model`` in place over calibration ``tokens`` (N, L). Returns the summary and the walk records."""
    from compress.walk import walk

    method = options if isinstance(options, SlimGPT) else prepare(model, options)
    before = _unique_parameters(model)
    decoder_before = _unique_parameters(model.model.layers)
    result = walk(model, tokens, [method], device=device, batch_size=batch_size, state_dir=state_dir)
    summary = PruneSummary(before, _unique_parameters(model), decoder_before, _unique_parameters(model.model.layers),
                           seconds=result.seconds)
    for plan, shape in zip(method.plans, model_shapes(model)):
        summary.layers.append({"ratio": round(plan.ratio, 4), "heads": shape.heads, "kv_heads": shape.kv_heads,
                               "ffn": shape.ffn})
    return summary, result.records


def pruned_config(model: torch.nn.Module):
    """The config that describes the model's current (possibly per-layer) widths."""
    shapes = model_shapes(model)
    return per_layer_config(model.config, [s.heads for s in shapes], [s.kv_heads for s in shapes],
                            [s.ffn for s in shapes])


def save_pruned(model: torch.nn.Module, tokenizer, out: str | os.PathLike, record: dict, *,
                source_path: str | os.PathLike | None = None, force: bool = False) -> Path:
    """Save atomically: a plain Llama config when every layer has the same widths, else the per-layer
    config with ``modeling_compress_llama.py`` beside it (``trust_remote_code=True`` reloads it)."""
    config = pruned_config(model)
    config._attn_implementation = model.config._attn_implementation
    extra = {FILE_NAME: modeling_source()} if config.model_type != model.config.model_type or \
        getattr(config, "auto_map", None) else {}
    original = model.config
    model.config = config
    try:
        return save_model(model, tokenizer, out, record, source_path=source_path, force=force, extra_files=extra)
    finally:
        model.config = original
