"""The attention mixers of a hybrid: the parent's attention (kept) and MLA (multi-head latent attention).

Both take the call of a Llama attention (``hidden_states``, ``position_embeddings``,
``attention_mask``, ``position_ids``, ``cache``) and return ``(output, None)``, so they sit in a
``LlamaDecoderLayer`` as its ``self_attn``. The mask may be None (causal), a 2-D padding mask
(b, t) of 1 = keep, or a 4-D mask (bool keep, or additive float) as transformers builds it.

MLA (DeepSeek-V3 names; no norm on the latents, so that an SVD initialisation at full rank is exact)::

    q  = q_b(q_a(x))                          n_h heads × (d_nope + d_rope), split per head
    kv = kv_a(x) = [c_kv (r_kv) ; k_pe (d_rope)]   c_kv and RoPE(k_pe) are what the cache keeps
    [k_nope ; v] = kv_b(c_kv)                  per KV head: d_nope key rows then head_dim value rows
    score(h, t) = (q_nope_h · k_nope_g(t) + RoPE(q_pe_h) · RoPE(k_pe(t))) / √head_dim,  g = KV head of h

Prefill expands the latents into keys and values; decode (few queries over a long cache) uses the
"absorbed" form, q_nope·W_kbᵀ against the latents and W_vb after the weighted sum, which costs as
much as plain attention instead of an up-projection of every cached token.

Self-contained (imports only torch and transformers).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.llama.modeling_llama import LlamaAttention, apply_rotary_pos_emb, rotate_half


def keep_mask(attention_mask, q_len: int, kv_len: int, device) -> torch.Tensor | None:
    """A bool (b|1, 1, q_len, kv_len) mask of the keys each query may see, or None for plain causal
    attention over the whole sequence (or a single query over everything before it)."""
    offset = kv_len - q_len
    if attention_mask is not None and attention_mask.dim() == 4:
        mask = attention_mask[..., -q_len:, -kv_len:]
        return mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
    pad = None
    if attention_mask is not None:
        pad = attention_mask[:, -kv_len:].to(torch.bool)
        if bool(pad.all()):
            pad = None
    if pad is None and (q_len == 1 or offset == 0):
        return None
    rows = torch.arange(q_len, device=device)[:, None] + offset
    causal = torch.arange(kv_len, device=device)[None, :] <= rows  # (q, kv)
    mask = causal[None, None]
    if pad is not None:
        mask = mask & pad[:, None, None, :]
    return mask


def attend(q, k, v, mask, scale: float) -> torch.Tensor:
    """SDPA with grouped-query heads: q (b, H, q, d), k/v (b, KV, t, d) → (b, q, H·d)."""
    causal = mask is None and q.shape[2] > 1
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale,
                                         enable_gqa=k.shape[1] != q.shape[1])
    return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)


class HybridAttention(LlamaAttention):
    """The parent's attention, unchanged weights (same parameter names), with the hybrid cache."""

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
        shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        q = self.q_proj(hidden_states).view(shape).transpose(1, 2)
        k = self.k_proj(hidden_states).view(shape).transpose(1, 2)
        v = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        mask = keep_mask(attention_mask, q.shape[2], k.shape[2], q.device)
        return self.o_proj(attend(q, k, v, mask, self.scaling)), None


def mla_rope(positions: torch.Tensor, dim: int, theta: float, dtype,
             inv_freq: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (b, t, dim) of RoPE over ``dim`` channels (rotate-half pairs (i, i + dim/2)), at the frequencies
    ``inv_freq`` (a float32 tensor of dim/2 on the positions' device) or theta^(-2i/dim)."""
    if inv_freq is None:
        inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=positions.device) / dim))
    freqs = positions[..., None].float() * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


class MLAttention(nn.Module):
    """Multi-head latent attention (see the module docstring); heads and KV heads as in the parent."""

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        self.d_rope, self.d_nope = config.d_rope, config.d_nope
        self.q_rank, self.kv_rank = config.q_lora_rank, config.kv_lora_rank
        self.scaling = self.head_dim ** -0.5  # the parent's softmax scale
        self.rope_theta = float((getattr(config, "rope_parameters", None) or {}).get("rope_theta", 10000.0))
        # plain numbers, made a float32 tensor where the positions are (not a buffer: .to(dtype) would round it,
        # and a model built on the meta device would keep no data)
        freqs = getattr(config, "mla_rope_inv_freq", None)
        self.rope_inv_freq = None if freqs is None else tuple(float(f) for f in freqs)
        self._inv_freq_on: dict[torch.device, torch.Tensor] = {}  # that tuple as a tensor, once per device
        hidden, bias = config.hidden_size, bool(getattr(config, "attention_bias", False))
        self.q_a_proj = nn.Linear(hidden, self.q_rank, bias=False)
        self.q_b_proj = nn.Linear(self.q_rank, self.heads * self.head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(hidden, self.kv_rank + self.d_rope, bias=False)
        self.kv_b_proj = nn.Linear(self.kv_rank, self.kv_heads * (self.d_nope + self.head_dim), bias=False)
        self.o_proj = nn.Linear(self.heads * self.head_dim, hidden, bias=bias)

    def kv_values_per_token(self) -> int:
        """Numbers one token adds to this layer's cache: the latent and the shared RoPE key."""
        return self.kv_rank + self.d_rope

    def _inv_freq(self, device) -> torch.Tensor | None:
        if self.rope_inv_freq is None:
            return None
        if device not in self._inv_freq_on:
            self._inv_freq_on[device] = torch.tensor(self.rope_inv_freq, dtype=torch.float32, device=device)
        return self._inv_freq_on[device]

    def _rope(self, x, cos, sin):
        return x * cos[:, None] + rotate_half(x) * sin[:, None]

    def latents(self, hidden_states, position_ids):
        """c_kv (b, 1, t, r_kv) and the rotated shared key k_pe (b, 1, t, d_rope) of new tokens: the cache entries."""
        kv = self.kv_a_proj_with_mqa(hidden_states)
        c_kv, k_pe = kv.split([self.kv_rank, self.d_rope], dim=-1)
        cos, sin = mla_rope(position_ids, self.d_rope, self.rope_theta, hidden_states.dtype,
                            self._inv_freq(position_ids.device))
        return c_kv[:, None], self._rope(k_pe[:, None], cos, sin), (cos, sin)

    def forward(self, hidden_states, attention_mask=None, position_ids=None, cache=None, **kwargs):
        b, length, _ = hidden_states.shape
        if position_ids is None:
            past = cache.get_seq_length(self.layer_idx) if cache is not None else 0
            position_ids = torch.arange(past, past + length, device=hidden_states.device)[None]
        position_ids = position_ids.expand(b, length)
        q = self.q_b_proj(self.q_a_proj(hidden_states)).view(b, length, self.heads, self.head_dim).transpose(1, 2)
        q_nope, q_pe = q.split([self.d_nope, self.d_rope], dim=-1)
        c_kv, k_pe, (cos, sin) = self.latents(hidden_states, position_ids)
        q_pe = self._rope(q_pe, cos, sin)
        if cache is not None:
            c_kv, k_pe = cache.update(c_kv, k_pe, self.layer_idx)
        total = c_kv.shape[2]
        mask = keep_mask(attention_mask, length, total, hidden_states.device)
        if length * 8 <= total:
            out = self._absorbed(q_nope, q_pe, c_kv[:, 0], k_pe[:, 0], mask)
        else:
            out = self._expanded(q_nope, q_pe, c_kv[:, 0], k_pe, mask)
        return self.o_proj(out), None

    def _split_kv_b(self):
        w = self.kv_b_proj.weight.view(self.kv_heads, self.d_nope + self.head_dim, self.kv_rank)
        return w[:, :self.d_nope], w[:, self.d_nope:]  # (KV, d_nope, r), (KV, d, r)

    def _expanded(self, q_nope, q_pe, c_kv, k_pe, mask):
        b, t = c_kv.shape[:2]
        kv = self.kv_b_proj(c_kv).view(b, t, self.kv_heads, self.d_nope + self.head_dim).transpose(1, 2)
        k_nope, v = kv.split([self.d_nope, self.head_dim], dim=-1)
        k = torch.cat([k_nope, k_pe.expand(b, self.kv_heads, t, self.d_rope)], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1)
        return attend(q, k, v, mask, self.scaling)

    def _absorbed(self, q_nope, q_pe, c_kv, k_pe, mask):
        b, _, length, _ = q_nope.shape
        w_k, w_v = self._split_kv_b()
        groups = self.heads // self.kv_heads
        q_nope = q_nope.view(b, self.kv_heads, groups, length, self.d_nope)
        q_lat = torch.einsum("bkgqd,kdr->bkgqr", q_nope, w_k)
        scores = torch.einsum("bkgqr,btr->bkgqt", q_lat, c_kv)
        scores = scores + torch.einsum("bkgqe,bte->bkgqt", q_pe.view(b, self.kv_heads, groups, length, -1), k_pe)
        scores = scores.to(torch.promote_types(scores.dtype, torch.float32)) * self.scaling  # float64 stays
        if mask is not None:
            scores = scores.masked_fill(~mask[:, :, None], float("-inf"))
        probs = scores.softmax(dim=-1).to(c_kv.dtype)
        ctx = torch.einsum("bkgqt,btr->bkgqr", probs, c_kv)
        out = torch.einsum("bkgqr,kdr->bkgqd", ctx, w_v)  # (b, KV, g, q, d)
        return out.reshape(b, self.heads, length, self.head_dim).transpose(1, 2).reshape(b, length, -1)

