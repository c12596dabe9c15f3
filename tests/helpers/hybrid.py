"""Shared builders for the hybrid (Zebra-Llama) tests: tiny hybrid configs and a step-by-step decode."""

from __future__ import annotations

import torch

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, max_position_embeddings=256, tie_word_embeddings=False)


def tiny_hybrid(layer_types, seed: int = 0, chunk: int = 8, **overrides):
    """A random tiny hybrid (4 heads, 2 KV heads, head_dim 16) with the given mixers, float32, eval mode."""
    from compress.hybrid import ZebraLlamaConfig, ZebraLlamaForCausalLM

    values = dict(TINY, num_hidden_layers=len(layer_types), layer_types=list(layer_types), q_lora_rank=24,
                  kv_lora_rank=12, qk_rope_head_dim=4, mamba_chunk_size=chunk)
    values.update(overrides)
    torch.manual_seed(seed)
    model = ZebraLlamaForCausalLM(ZebraLlamaConfig(**values)).eval()
    with torch.no_grad():  # fresh Mamba2 params decay fast; give them visible effect (larger dt, nonzero conv)
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.08)
    return model


@torch.no_grad()
def prefill_then_decode(model, ids: torch.Tensor, prefill: int) -> torch.Tensor:
    """Logits of a prefill of ``prefill`` tokens and then one token at a time with the cache."""
    out = model(input_ids=ids[:, :prefill], use_cache=True)
    cache, logits = out.cache, [out.logits]
    for t in range(prefill, ids.shape[1]):
        out = model(input_ids=ids[:, t:t + 1], cache=cache, use_cache=True)
        cache = out.cache
        logits.append(out.logits)
    return torch.cat(logits, dim=1)


def naive_scan(x, dt, A, B, C, state=None):
    """The Mamba2 recurrence token by token in float64, written out independently of compress.hybrid:
    S_t = exp(dt_t A) S_{t-1} + dt_t x_t B_tᵀ, y_t = S_t C_t; head h reads group h // (H / G)."""
    x, dt, A, B, C = (t.double() for t in (x, dt, A, B, C))
    b, length, heads, p = x.shape
    n = B.shape[-1]
    per_b, per_c = heads // B.shape[2], heads // C.shape[2]
    S = torch.zeros(b, heads, p, n, dtype=torch.float64) if state is None else state.double().clone()
    ys = torch.zeros(b, length, heads, p, dtype=torch.float64)
    for t in range(length):
        for h in range(heads):
            bt, ct = B[:, t, h // per_b], C[:, t, h // per_c]  # (b, n)
            S[:, h] = torch.exp(dt[:, t, h] * A[h])[:, None, None] * S[:, h] \
                + (dt[:, t, h][:, None] * x[:, t, h])[:, :, None] * bt[:, None, :]
            ys[:, t, h] = torch.einsum("bpn,bn->bp", S[:, h], ct)
    return ys, S
