"""Cost of a model: parameters, bytes on disk, KV-cache bytes per token, prefill and decode speed."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch


@dataclass
class CostResult:
    parameters: int
    bytes_on_disk: int
    kv_cache_bytes_per_token: int
    prefill_tokens_per_s: float
    decode_tokens_per_s: float

    def as_dict(self) -> dict:
        return asdict(self)


def count_parameters(model: torch.nn.Module) -> int:
    """Unique parameters (tied embeddings counted once)."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        total += p.numel()
    return total


def bytes_on_disk(folder: str | Path | None) -> int:
    if folder is None:
        return 0
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))


def kv_cache_bytes_per_token(model: torch.nn.Module, dtype_bytes: int | None = None) -> int:
    """K and V of every layer for one token: Σ_layers 2 · kv_heads · head_dim · bytes."""
    if dtype_bytes is None:
        dtype_bytes = next(model.parameters()).element_size()
    total = 0
    for layer in model.model.layers:
        attn = layer.self_attn
        total += 2 * attn.k_proj.out_features * dtype_bytes  # k_proj rows = kv_heads · head_dim
    return total


@torch.no_grad()
def tokens_per_second(model: torch.nn.Module, prefill_len: int = 512, decode_steps: int = 32,
                      batch_size: int = 1, repeats: int = 2) -> tuple[float, float]:
    """Prefill and greedy-decode throughput (best of ``repeats``) on random tokens."""
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (batch_size, prefill_len), generator=generator).to(device)
    best_prefill, best_decode = 0.0, 0.0
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        out = model(input_ids=ids, use_cache=True)
        _sync(device)
        t1 = time.perf_counter()
        cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        for _ in range(decode_steps):
            out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
            cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
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
    return CostResult(parameters=count_parameters(model), bytes_on_disk=bytes_on_disk(folder),
                      kv_cache_bytes_per_token=kv_cache_bytes_per_token(model),
                      prefill_tokens_per_s=prefill, decode_tokens_per_s=decode)
