"""The hybrid model: prefill + decode = one full forward for every mixer, generate, the init from attention."""

from __future__ import annotations

import math

import pytest
import torch

from compress.hybrid.build import hybridize, mamba2_from_attention, mla_from_attention
from compress.hybrid.zebra_attention import MLAttention
from compress.hybrid.zebra_mamba2 import Mamba2Mixer
from tests.helpers import make_tiny_llama
from tests.helpers.hybrid import prefill_then_decode, tiny_hybrid

IDS = torch.randint(0, 128, (2, 29), generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("types", [["mla", "mla"], ["mamba2", "mamba2"], ["mla", "mamba2", "attention", "mamba2"]],
                         ids=["mla", "mamba2", "mixed"])
@pytest.mark.parametrize("prefill", [1, 11, 16])  # a single token, across a chunk boundary (chunk 8), a multiple
def test_prefill_then_decode_equals_one_forward(types, prefill, one_thread):
    model = tiny_hybrid(types)
    with torch.no_grad():
        full = model(input_ids=IDS, use_cache=False).logits
    steps = prefill_then_decode(model, IDS, prefill)
    assert full.abs().max() > 0.1  # the logits are not trivially small
    assert (steps - full).abs().max() <= 1e-4


def test_cache_holds_latents_not_keys_and_values(one_thread):
    model = tiny_hybrid(["mla", "mamba2", "attention"])
    with torch.no_grad():
        cache = model(input_ids=IDS[:, :10], use_cache=True).cache
    per_layer = cache.bytes_per_layer()
    assert per_layer[0] == 2 * 10 * (12 + 4) * 4  # batch · tokens · (r_kv + d_rope) · fp32
    conv_dim = 2 * 16 + 2 * 16 + 4 * 16  # x and B from 2 KV heads, C from 4 heads (head_dim 16)
    assert per_layer[1] == 2 * (conv_dim * 3 * 4 + 4 * 16 * 16 * 4)  # conv inputs (d_conv − 1) + SSM state
    assert per_layer[2] == 2 * 10 * 2 * 2 * 16 * 4  # K and V of 2 KV heads
    with torch.no_grad():
        model(input_ids=IDS[:, 10:11], cache=cache, use_cache=True)
    assert cache.bytes_per_layer()[1] == per_layer[1] and cache.get_seq_length() == 11


def test_generate_is_greedy_decoding_with_the_cache(one_thread):
    model = tiny_hybrid(["mamba2", "mla", "attention"])
    prompt = IDS[:1, :7]
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False,
                         pad_token_id=0)
    ids = prompt
    with torch.no_grad():  # greedy without any cache: the full sequence every step
        for _ in range(8):
            nxt = model(input_ids=ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
    assert torch.equal(out, ids)


def test_kept_attention_reproduces_the_parent(one_thread):
    parent = make_tiny_llama(num_hidden_layers=3)
    hybrid = hybridize(parent, mla_layers=[], mamba_layers=[])
    with torch.no_grad():
        assert torch.allclose(hybrid(input_ids=IDS).logits, parent(input_ids=IDS).logits, atol=1e-5)
    assert prefill_then_decode(hybrid, IDS, 9).sub(parent(input_ids=IDS).logits).abs().max() <= 1e-4


@torch.no_grad()
def test_full_rank_mla_reproduces_q_and_the_nope_keys_and_values():
    """r_q = heads·head_dim = 64 = hidden and r_kv = 2·kv_heads·head_dim = 64 (the SVD's full rank): q_b·q_a x =
    q_proj x on every channel, and kv_b·c_kv gives k_proj x on each head's first d_nope channels and v_proj x,
    within 1e-5 relative to the projections' scale (float32 weights from a float64 SVD)."""
    parent = make_tiny_llama(num_hidden_layers=2)
    hybrid = hybridize(parent, mla_layers=[0, 1], q_rank=64, kv_rank=64, rope_dim=4)
    x = torch.randn(3, 5, 64)
    for layer, old in zip(hybrid.model.layers, parent.model.layers):
        mla, attn = layer.self_attn, old.self_attn
        assert isinstance(mla, MLAttention)
        q, want_q = mla.q_b_proj(mla.q_a_proj(x)), attn.q_proj(x)
        assert (q - want_q).abs().max() <= 1e-5 * want_q.abs().max()
        c_kv = mla.kv_a_proj_with_mqa(x)[..., :64]
        kv = mla.kv_b_proj(c_kv).view(3, 5, 2, 12 + 16)
        k, v = attn.k_proj(x).view(3, 5, 2, 16), attn.v_proj(x).view(3, 5, 2, 16)
        assert (kv[..., :12] - k[..., :12]).abs().max() <= 1e-5 * k.abs().max()
        assert (kv[..., 12:] - v).abs().max() <= 1e-5 * v.abs().max()
        rope_key = mla.kv_a_proj_with_mqa(x)[..., 64:]  # the shared RoPE key: mean of the heads' last 4 channels
        assert torch.allclose(rope_key, k[..., 12:].mean(2), atol=1e-5)
        assert torch.equal(mla.o_proj.weight, attn.o_proj.weight)


@torch.no_grad()
def test_lower_rank_mla_is_the_truncated_svd():
    parent = make_tiny_llama(num_hidden_layers=1)
    mla = hybridize(parent, mla_layers=[0], q_rank=16, kv_rank=8, rope_dim=4).model.layers[0].self_attn
    w_q = parent.model.layers[0].self_attn.q_proj.weight.double()
    s = torch.linalg.svdvals(w_q)
    err = torch.linalg.matrix_norm(mla.q_b_proj.weight.double() @ mla.q_a_proj.weight.double() - w_q)
    assert math.isclose(err.item(), s[16:].norm().item(), rel_tol=1e-4)  # Eckart–Young: the discarded energy


@torch.no_grad()
def test_mamba2_init_maps_v_k_q_o_and_keeps_fresh_ssm_parameters():
    parent = make_tiny_llama(num_hidden_layers=2)
    hybrid = hybridize(parent, mla_layers=[], mamba_layers="rest", seed=3)
    for layer, old in zip(hybrid.model.layers, parent.model.layers):
        mixer, attn = layer.self_attn, old.self_attn
        assert isinstance(mixer, Mamba2Mixer)
        parts = mixer.split_in_proj()
        assert torch.equal(parts["x"], attn.v_proj.weight) and torch.equal(parts["B"], attn.k_proj.weight)
        assert torch.equal(parts["C"], attn.q_proj.weight) and torch.equal(mixer.out_proj.weight, attn.o_proj.weight)
        a = mixer.A_log.exp()
        assert bool(((a >= 1) & (a <= 16)).all()) and torch.equal(mixer.D, torch.ones(4))
        dt = torch.nn.functional.softplus(mixer.dt_bias)
        assert bool(((dt >= 1e-3 - 1e-7) & (dt <= 0.1 + 1e-7)).all())
        assert mixer.conv1d.weight.shape == (2 * 16 + 2 * 16 + 4 * 16, 1, 4)  # over x | B | C, kernel 4


def test_one_layer_mixers_from_attention_fit_the_layer(one_thread):
    """The per-layer builders (what a layer-wise distillation uses) run inside the parent's own layer."""
    parent = make_tiny_llama(num_hidden_layers=2)
    config = hybridize(parent, mla_layers=[0], mamba_layers=[1]).config
    x = torch.randn(2, 9, 64)
    cos_sin = parent.model.rotary_emb(x, torch.arange(9)[None])
    for index, build in ((0, mla_from_attention), (1, mamba2_from_attention)):
        mixer = build(parent.model.layers[index].self_attn, config, index)
        out, _ = mixer(x, position_embeddings=cos_sin, position_ids=torch.arange(9)[None], attention_mask=None)
        assert out.shape == x.shape and torch.isfinite(out).all()
