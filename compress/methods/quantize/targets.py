"""Which Linear modules a quantization method touches: every Linear of a decoder layer not ignored."""

from __future__ import annotations

import fnmatch
import re

import torch

from compress.arch import module_name
from compress.errors import CompressError, ConfigError


def matches(pattern: str, name: str) -> bool:
    """``re:REGEX`` (re.match, as compressed-tensors' ignore lists) or a shell pattern on the full name."""
    if pattern.startswith("re:"):
        return re.match(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern) or name.endswith("." + pattern) or name == pattern


def is_ignored(name: str, patterns: list[str]) -> bool:
    return any(matches(p, name) for p in patterns)


def linear_names(model: torch.nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def check_ignore_patterns(model: torch.nn.Module, patterns: list[str]) -> None:
    """Every ignore pattern must match at least one Linear of the model (a typo ignores nothing)."""
    names = linear_names(model)
    for pattern in patterns:
        if not any(matches(pattern, n) for n in names):
            raise ConfigError(f"ignore pattern '{pattern}' matches no Linear module of the model "
                              f"(names look like '{names[0] if names else '?'}')")


def layer_targets(layer: torch.nn.Module, index: int, patterns: list[str], order=None) -> list[str]:
    """Names (inside the layer) of the Linear modules to quantize, in ``order`` when given."""
    names = [n for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)]
    if order is not None:
        ranked = {n: k for k, n in enumerate(order)}
        names.sort(key=lambda n: ranked.get(n, len(ranked)))
    return [n for n in names if not is_ignored(module_name(index, n), patterns)]


def check_group_size(layer: torch.nn.Module, index: int, names: list[str], group_size: int, method: str) -> None:
    """Each group must divide its module's input width; checked per layer, as an earlier stage of the same
    walk (structured pruning) may have changed the widths since the walk started."""
    if group_size == -1:
        return
    for name in names:
        width = layer.get_submodule(name).in_features
        if width % group_size:
            raise CompressError(f"{method}: group_size {group_size} does not divide the input width {width} of "
                                f"{module_name(index, name)}; choose a group size that divides every width "
                                "(-1: per channel), or prune to multiples of it (slimgpt: ffn_multiple)")


def check_quantizable(model: torch.nn.Module, patterns: list[str]) -> None:
    """Before any data: the model is still float (an already quantized checkpoint is not what GPTQ/RTN
    need), every ignore pattern matches a Linear, and something is left to quantize."""
    from compress.arch import decoder_layers

    config = getattr(model, "config", None)
    quantization = getattr(config, "quantization_config", None)
    if quantization:
        method = quantization.get("quant_method") if isinstance(quantization, dict) else \
            getattr(quantization, "quant_method", "quantized")
        raise CompressError(f"the model is already quantized ({method}); quantize the float model it came from instead")
    check_ignore_patterns(model, patterns)
    if not any(layer_targets(layer, i, patterns) for i, layer in enumerate(decoder_layers(model))):
        raise CompressError("the ignore patterns leave no Linear module to quantize")


AUTO_GROUP_SIZES = (128, 64, 32)


def resolve_group_size(model: torch.nn.Module, config) -> str | None:
    """Set an unset (auto) ``config.group_size`` for ``model``: the first of 128, 64, 32 that divides
    every quantized input width (smollm2-135m's 576: 64), else -1 (per channel). Returns what was
    chosen and why, for the closing table, or None when the size was given."""
    from compress.arch import decoder_layers

    if config.group_size is not None:
        return None
    widths = sorted({layer.get_submodule(n).in_features for i, layer in enumerate(decoder_layers(model))
                     for n in layer_targets(layer, i, config.ignore)})
    fits = [g for g in AUTO_GROUP_SIZES if all(w % g == 0 for w in widths)]
    config.group_size = fits[0] if fits else -1
    skipped = [g for g in AUTO_GROUP_SIZES if g > config.group_size]
    why = f"{', '.join(map(str, skipped))} do{'es' if len(skipped) == 1 else ''} not divide every input width " \
          f"({', '.join(map(str, widths))})" if skipped else "divides every input width"
    return f"{config.group_size} (auto: {why})"
