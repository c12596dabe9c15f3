"""Cost of a model: parameters, bytes on disk, KV-cache bytes per token, prefill and decode speed."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch


@dataclass
class CostResult:
    parameters: int  # weights the model represents: a packed quantized Linear counts as its out × in
    parameter_bytes: int  # bytes of every parameter tensor held (packed codes, scales and zero points)
    bytes_on_disk: int
    kv_cache_bytes_per_token: int
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    kv_cache_fraction: float | None = None  # hybrids only: KV bytes per token ÷ the parent's
    ssm_state_bytes: int | None = None  # hybrids only: Mamba2 states per sequence (constant in the length)

    def as_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None or k not in HYBRID_KEYS}


HYBRID_KEYS = ("kv_cache_fraction", "ssm_state_bytes")


# the tensors of a compressed-tensors quantized Linear: its weights are ``weight_shape`` many values
PACKED = ("weight_packed", "weight_scale", "weight_zero_point", "weight_g_idx", "weight_shape")


def count_parameters(model: torch.nn.Module) -> int:
    """Unique weights the model represents (tied embeddings counted once): a quantized Linear loaded
    in a packed format counts its out × in weights, not its packed words, scales and zero points."""
    seen, total = set(), 0
    for module in model.modules():
        shape = getattr(module, "weight_shape", None)
        if isinstance(shape, torch.Tensor) and hasattr(module, "weight_packed"):
            total += int(torch.prod(shape.long()))
            seen.update(id(getattr(module, name)) for name in PACKED if getattr(module, name, None) is not None)
    for p in model.parameters():
        if id(p) in seen or p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        total += p.numel()
    return total


def parameter_bytes(model: torch.nn.Module) -> int:
    """Bytes of the unique parameter tensors as held (packed codes, scales and zero points included)."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def bytes_on_disk(folder: str | Path | None) -> int:
    if folder is None:
        return 0
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))


def kv_cache_bytes_per_token(model: torch.nn.Module, dtype_bytes: int | None = None) -> int:
    """K and V of every layer for one token: Σ_layers 2 · kv_heads · head_dim · bytes. A hybrid's mixer
    that says what it caches (``kv_values_per_token``: r_kv + d_rope for MLA, 0 for Mamba2) counts that."""
    if dtype_bytes is None:
        dtype_bytes = next(model.parameters()).element_size()
    total = 0
    for layer in model.model.layers:
        attn = layer.self_attn
        if hasattr(attn, "kv_values_per_token"):
            total += attn.kv_values_per_token() * dtype_bytes
            continue
        if not hasattr(attn, "k_proj"):  # a searched layer without attention (NoAttention) caches nothing
            continue
        total += 2 * attn.k_proj.out_features * dtype_bytes  # k_proj rows = kv_heads · head_dim
    return total


def is_hybrid(model: torch.nn.Module) -> bool:
    """Whether some decoder layer's mixer is not attention (it then says what it caches)."""
    return any(hasattr(layer.self_attn, "kv_values_per_token") for layer in model.model.layers)


def kv_cache_fraction(model: torch.nn.Module) -> float:
    """KV-cache bytes per token ÷ the parent's (every layer attention with the config's KV heads and
    head_dim): for an MLA/Mamba2 hybrid n_MLA · (r_kv + d_rope) / (L · kv_heads · head_dim · 2)."""
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    parent = len(model.model.layers) * 2 * config.num_key_value_heads * head_dim
    return kv_cache_bytes_per_token(model, dtype_bytes=1) / parent


def ssm_state_bytes(model: torch.nn.Module, batch: int = 1) -> int:
    """Bytes of the recurrent (Mamba2) states of ``batch`` sequences: conv inputs and SSM states."""
    size = next(model.parameters()).element_size()
    return sum(layer.self_attn.state_bytes(batch, size) for layer in model.model.layers
               if hasattr(layer.self_attn, "state_bytes"))


@torch.no_grad()
def tokens_per_second(model: torch.nn.Module, prefill_len: int = 512, decode_steps: int = 32,
                      batch_size: int = 1, repeats: int = 2, all_logits: bool = True) -> tuple[float, float]:
    """Prefill and greedy-decode throughput (best of ``repeats``) on random tokens. ``all_logits=False``: the
    prefill computes the last position's logits only (``logits_to_keep=1``, as ``generate`` and serving engines
    do), so the LM head's share of a prefill does not hide what the decoder's size changes."""
    import inspect

    keep = {} if all_logits or "logits_to_keep" not in inspect.signature(model.forward).parameters \
        else {"logits_to_keep": 1}
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (batch_size, prefill_len), generator=generator).to(device)
    best_prefill, best_decode = 0.0, 0.0
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        out = model(input_ids=ids, use_cache=True, **keep)
        _sync(device)
        t1 = time.perf_counter()
        cache, nxt = out.cache, out.logits[:, -1:].argmax(-1)
        for _ in range(decode_steps):
            out = model(input_ids=nxt, cache=cache, use_cache=True)
            cache, nxt = out.cache, out.logits[:, -1:].argmax(-1)
        _sync(device)
        t2 = time.perf_counter()
        best_prefill = max(best_prefill, batch_size * prefill_len / (t1 - t0))
        best_decode = max(best_decode, batch_size * decode_steps / (t2 - t1))
    return best_prefill, best_decode


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure_cost(model: torch.nn.Module, folder: str | Path | None = None, prefill_len: int = 512,
                 decode_steps: int = 32) -> CostResult:
    prefill, decode = tokens_per_second(model, prefill_len, decode_steps)
    return CostResult(parameters=count_parameters(model), parameter_bytes=parameter_bytes(model),
                      bytes_on_disk=bytes_on_disk(folder),
                      kv_cache_bytes_per_token=kv_cache_bytes_per_token(model),
                      prefill_tokens_per_s=prefill, decode_tokens_per_s=decode,
                      kv_cache_fraction=kv_cache_fraction(model) if is_hybrid(model) else None,
                      ssm_state_bytes=ssm_state_bytes(model) if is_hybrid(model) else None)
