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


# tiny Llama: head_dim 16, RoPE pairs (i, i + 8); rope_dim 4 keeps the two fastest pairs i = 0, 1 as MLA's RoPE
# channels [0, 1, 8, 9] and makes the six slower ones [2..7, 10..15] the position-free part
ORDER = [2, 3, 4, 5, 6, 7, 10, 11, 12, 13, 14, 15, 0, 1, 8, 9]


@torch.no_grad()
def test_full_rank_mla_reproduces_q_and_the_nope_keys_and_values():
    """r_q = heads·head_dim = 64 = hidden and r_kv = 64 ≥ the rank of [nope keys ; values] (2·(12 + 16) = 56): q_b·q_a x
    = q_proj x on every channel and kv_b·c_kv gives k_proj x on each head's position-free channels and v_proj x,
    each head's channels reordered [slow pairs ; fast pairs], within 1e-5 relative to the projections' scale
    (float32 weights from a float64 SVD); the shared RoPE key is the KV heads' mean of the fast channels."""
    parent = make_tiny_llama(num_hidden_layers=2)
    hybrid = hybridize(parent, mla_layers=[0, 1], q_rank=64, kv_rank=64, rope_dim=4)
    x = torch.randn(3, 5, 64)
    for layer, old in zip(hybrid.model.layers, parent.model.layers):
        mla, attn = layer.self_attn, old.self_attn
        assert isinstance(mla, MLAttention)
        q, want_q = mla.q_b_proj(mla.q_a_proj(x)), attn.q_proj(x).view(3, 5, 4, 16)[..., ORDER].reshape(3, 5, 64)
        assert (q - want_q).abs().max() <= 1e-5 * want_q.abs().max()
        c_kv = mla.kv_a_proj_with_mqa(x)[..., :64]
        kv = mla.kv_b_proj(c_kv).view(3, 5, 2, 12 + 16)
        k, v = attn.k_proj(x).view(3, 5, 2, 16)[..., ORDER], attn.v_proj(x).view(3, 5, 2, 16)
        assert (kv[..., :12] - k[..., :12]).abs().max() <= 1e-5 * k.abs().max()
        assert (kv[..., 12:] - v).abs().max() <= 1e-5 * v.abs().max()
        rope_key = mla.kv_a_proj_with_mqa(x)[..., 64:]
        assert torch.allclose(rope_key, k[..., 12:].mean(2), atol=1e-5)
        assert torch.equal(mla.o_proj.weight, attn.o_proj.weight)


ROPES = {"default": {"rope_type": "default", "rope_theta": 10000.0},
         # llama3 rescales the slower frequencies: with these settings pair 1 (wavelength ≈ 20 tokens) is changed
         "llama3": {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}


@pytest.mark.parametrize("rope", list(ROPES))
@torch.no_grad()
def test_full_rank_mla_is_the_parent_when_its_slow_pairs_are_silent_and_kv_heads_share_the_fast_ones(rope, one_thread):
    """The approximations of the MLA initialisation are exactly two: the slow RoPE pairs lose their rotation and the
    KV heads share one RoPE key. A parent without either (queries zero on the slow pairs, both KV heads with the
    same fast-pair key rows) must come out unchanged at full rank: logits equal to the parent's (1e-5 relative),
    one forward and prefill + decode (the absorbed path), for the default RoPE and llama3's rescaled frequencies."""
    parent = make_tiny_llama(num_hidden_layers=2, rope_parameters=ROPES[rope])
    slow = torch.tensor([2, 3, 4, 5, 6, 7, 10, 11, 12, 13, 14, 15])
    fast = torch.tensor([0, 1, 8, 9])
    for layer in parent.model.layers:
        attn = layer.self_attn
        attn.q_proj.weight.view(4, 16, 64)[:, slow] = 0
        k = attn.k_proj.weight.view(2, 16, 64)
        k[1, fast] = k[0, fast]
    hybrid = hybridize(parent, mla_layers=[0, 1], q_rank=64, kv_rank=64, rope_dim=4)
    want = parent(input_ids=IDS).logits
    got = hybrid(input_ids=IDS, use_cache=False).logits
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    assert (prefill_then_decode(hybrid, IDS, 11) - want).abs().max() <= 1e-5 * want.abs().max()
    # and the check can fail: MLA's earlier frequencies theta^(-2j/d_rope) in one layer (only pair 1 differs)
    hybrid.model.layers[0].self_attn.rope_inv_freq = None
    assert (hybrid(input_ids=IDS, use_cache=False).logits - want).abs().max() > 1e-4 * want.abs().max()


@torch.no_grad()
def test_lower_rank_mla_is_the_truncated_svd():
    parent = make_tiny_llama(num_hidden_layers=1)
    mla = hybridize(parent, mla_layers=[0], q_rank=16, kv_rank=8, rope_dim=4).model.layers[0].self_attn
    w_q = parent.model.layers[0].self_attn.q_proj.weight.double().view(4, 16, 64)[:, ORDER].reshape(64, 64)
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


def test_config_refuses_a_wrong_number_of_mla_frequencies():
    from compress.hybrid.configuration_zebra_llama import ZebraLlamaConfig

    config = tiny_hybrid(["mla", "mla"]).config.to_dict()
    for key in ("model_type", "transformers_version", "architectures"):
        config.pop(key, None)
    assert ZebraLlamaConfig(**{**config, "mla_rope_inv_freq": [1.0, 0.1]}).mla_rope_inv_freq == [1.0, 0.1]
    with pytest.raises(Exception, match="mla_rope_inv_freq needs qk_rope_head_dim / 2 = 2 frequencies, got 3"):
        ZebraLlamaConfig(**{**config, "mla_rope_inv_freq": [1.0, 0.1, 0.01]})
