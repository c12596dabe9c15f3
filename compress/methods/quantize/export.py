"""Writing quantized models: compressed-tensors ``pack-quantized`` and the GPTQ v1 layout.

Both read the grid each quantized Linear keeps in ``module.quant_params`` (set by RTN and GPTQ), so
the codes on disk are exactly the ones the in-memory model was evaluated with.

* ``compressed-tensors``: ``pack-quantized`` for symmetric grids: ``weight_packed`` (int32, codes
  packed along the input dimension by the compressed-tensors library itself), ``weight_scale``,
  ``weight_shape``; ``naive-quantized`` (int8 codes, scale, zero point) for asymmetric grids (see
  :func:`compressed_tensors_format`); ``quantization_config`` in config.json. Stock transformers
  reloads both with the compressed-tensors package installed; vLLM serves the 4- and 8-bit ones.
* ``gptq``: ``qweight`` (in·bits/32, out), ``qzeros`` (groups, out·bits/32) holding z − 1 (the v1
  convention), ``scales`` (groups, out) float16, ``g_idx`` (in,), plus quantize_config.json.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from compress.errors import CompressError
from compress.export import atomic_output, write_record
from compress.methods.quantize.grid import QuantParams
from compress.methods.quantize.pack import pack_int32

log = logging.getLogger(__name__)
FORMATS = ("compressed-tensors", "gptq")
WEIGHTS_FILE = "model.safetensors"


def quantized_linears(model: torch.nn.Module) -> dict[str, tuple[torch.nn.Linear, QuantParams]]:
    return {name: (m, m.quant_params) for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and getattr(m, "quant_params", None) is not None}


def check_not_quantized(folder: str | os.PathLike) -> None:
    """Refuse a checkpoint that is already quantized: its weights are not the float ones GPTQ needs."""
    folder = Path(folder)
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    method = (config.get("quantization_config") or {}).get("quant_method")
    if method or (folder / "quantize_config.json").is_file():
        raise CompressError(f"{folder} is already quantized ({method or 'quantize_config.json'}); "
                            "quantize the float model it came from instead")


def check_exportable(model: torch.nn.Module, names: list[str], bits: int, group_size: int, fmt: str) -> None:
    """Shapes the format can hold, checked before the long work: groups divide each input width, and
    the GPTQ layout packs whole 32-bit words along both dimensions."""
    if fmt not in FORMATS:
        raise CompressError(f"unknown --format '{fmt}' (choose {' or '.join(FORMATS)})")
    modules = dict(model.named_modules())
    for name in names:
        out, width = modules[name].weight.shape
        check_shape(name, out, width, bits, group_size, fmt)


def check_shape(name: str, out: int | None, width: int | None, bits: int, group_size: int, fmt: str) -> None:
    """One module of ``out`` × ``width`` (None: a dimension not known yet, not checked)."""
    if width is not None and group_size != -1 and width % group_size:
        raise CompressError(f"--group-size {group_size} does not divide the input width {width} of {name}; "
                            "choose a divisor (e.g. 32, 64) or -1 for per-channel")
    words = [d for d in (width, out) if d is not None]
    if fmt == "gptq" and any((d * bits) % 32 for d in words):
        raise CompressError(f"--format gptq packs {bits}-bit codes into 32-bit words: {name} is "
                            f"{out or '?'}×{width or '?'}, both must be multiples of {32 // math.gcd(32, bits)}")


def _base_state(model: torch.nn.Module, quantized: dict) -> dict[str, torch.Tensor]:
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # tied to the embeddings; transformers re-ties on load
    for name in quantized:
        state.pop(f"{name}.weight")
    return state


def _save_common(model, tokenizer, tmp: Path, state: dict, quantization_config: dict) -> None:
    save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
    model.config.save_pretrained(tmp)
    config = json.loads((tmp / "config.json").read_text())
    config["quantization_config"] = quantization_config
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)


def compressed_tensors_format(params: QuantParams) -> str:
    """``pack-quantized`` for symmetric grids; ``naive-quantized`` (int8 codes) for asymmetric ones.

    compressed-tensors 0.20 packs asymmetric zero points on save but its load path (through
    transformers 5) expects them unpacked, so an asymmetric pack-quantized checkpoint does not reload;
    the naive layout does, at one byte per weight.
    """
    return "pack-quantized" if params.sym else "naive-quantized"


def compressed_tensors_config(params: QuantParams, ignore: list[str]) -> tuple[dict, object]:
    """The ``quantization_config`` of config.json and the scheme the compressor packs with."""
    import compressed_tensors
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    strategy = "channel" if params.group_size == -1 else "group"
    args = QuantizationArgs(num_bits=params.bits, type="int", symmetric=params.sym, strategy=strategy,
                            group_size=None if params.group_size == -1 else params.group_size)
    fmt = compressed_tensors_format(params)
    scheme = QuantizationScheme(targets=["Linear"], weights=args, format=fmt)
    config = QuantizationConfig(config_groups={"group_0": scheme}, format=fmt,
                                quantization_status="compressed", ignore=ignore)
    data = {"version": compressed_tensors.__version__, "quant_method": "compressed-tensors",
            "sparsity_config": {}, "transform_config": {}, **config.model_dump(exclude=["quant_method"])}
    return data, scheme


def compressed_tensors_state(module: torch.nn.Linear, params: QuantParams, scheme) -> dict[str, torch.Tensor]:
    """The packed tensors of one Linear, made by compressed-tensors' own compressor."""
    from compressed_tensors.compressors.naive_quantized.base import NaiveQuantizationCompressor
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor

    offset = 2 ** (params.bits - 1)  # compressed-tensors stores signed codes and zero points
    dtype = module.weight.dtype
    tensors = {"weight": params.dequantize().to(dtype), "weight_scale": params.scale.to(dtype),
               "weight_zero_point": (params.zero - offset).to(torch.int8)}
    compressor = PackedQuantizationCompressor if params.sym else NaiveQuantizationCompressor
    packed = compressor.compress(tensors, scheme)
    if module.bias is not None:
        packed.pop("bias", None)
    return {k: v.contiguous() for k, v in packed.items()}


def single_grid(quantized: dict) -> QuantParams:
    kinds = {(p.bits, p.group_size, p.sym) for _, p in quantized.values()}
    if not quantized:
        raise CompressError("no quantized Linear module to export")
    if len(kinds) > 1:
        raise CompressError(f"mixed quantization settings {sorted(kinds)} cannot be written as one config")
    return next(iter(quantized.values()))[1]


def write_compressed_tensors(model, tokenizer, folder: Path) -> None:
    """Weights, config (with ``quantization_config``) and tokenizer into an existing ``folder``."""
    quantized = quantized_linears(model)
    first = single_grid(quantized)
    ignore = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n not in quantized]
    qconfig, scheme = compressed_tensors_config(first, ignore)
    state = _base_state(model, quantized)
    for name, (module, params) in quantized.items():
        for key, tensor in compressed_tensors_state(module, params, scheme).items():
            state[f"{name}.{key}"] = tensor
    _save_common(model, tokenizer, folder, state, qconfig)


def save_compressed_tensors(model, tokenizer, out, record: dict, source_path=None, force: bool = False,
                            extra_files: dict[str, str] | None = None) -> Path:
    quantized = quantized_linears(model)
    single_grid(quantized)  # fails before the output folder is touched
    with atomic_output(out, [source_path], force) as tmp:
        write_compressed_tensors(model, tokenizer, tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        write_record(tmp, record)
    return Path(out).expanduser().resolve()


def gptq_tensors(params: QuantParams) -> dict[str, torch.Tensor]:
    """GPTQ v1 tensors of one Linear (zeros stored minus one, as AutoGPTQ v1 does)."""
    qweight = pack_int32(params.codes.t(), params.bits, dim=0)  # codes (in, out) → (in·bits/32, out)
    qzeros = pack_int32((params.zero.t() - 1) & (2 ** params.bits - 1), params.bits, dim=1)  # (groups, out·bits/32)
    return {"qweight": qweight, "qzeros": qzeros, "scales": params.scale.t().contiguous().half(),
            "g_idx": params.g_idx.to(torch.int32).contiguous()}


def gptq_quantize_config(params: QuantParams, act_order: bool, sequential: bool, damp: float,
                         static_groups: bool = True) -> dict:
    """quantize_config.json; ``static_groups``: grids fitted before any update (always so with act_order)."""
    return {"bits": params.bits, "group_size": params.group_size, "desc_act": act_order,
            "static_groups": bool(static_groups or act_order),
            "sym": params.sym, "true_sequential": sequential, "damp_percent": damp, "lm_head": False,
            "quant_method": "gptq", "checkpoint_format": "gptq", "model_file_base_name": "model"}


def write_gptq(model, tokenizer, folder: Path, act_order: bool = False, sequential: bool = True, damp: float = 0.01,
               static_groups: bool = True) -> None:
    """Weights, config, quantize_config.json and tokenizer into an existing ``folder``."""
    quantized = quantized_linears(model)
    first = single_grid(quantized)
    qconfig = gptq_quantize_config(first, act_order, sequential, damp, static_groups)
    state = _base_state(model, quantized)
    for name, (module, params) in quantized.items():
        for key, tensor in gptq_tensors(params).items():
            state[f"{name}.{key}"] = tensor
        if module.bias is not None:
            state[f"{name}.bias"] = module.bias.detach().half()
    _save_common(model, tokenizer, folder, state, qconfig)
    (folder / "quantize_config.json").write_text(json.dumps(qconfig, indent=2) + "\n")


def save_gptq(model, tokenizer, out, record: dict, source_path=None, force: bool = False, act_order: bool = False,
              sequential: bool = True, damp: float = 0.01, extra_files: dict[str, str] | None = None,
              static_groups: bool = True) -> Path:
    single_grid(quantized_linears(model))  # fails before the output folder is touched
    with atomic_output(out, [source_path], force) as tmp:
        write_gptq(model, tokenizer, tmp, act_order, sequential, damp, static_groups)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        write_record(tmp, record)
    return Path(out).expanduser().resolve()
