"""Perplexity, fidelity and cost against independent computations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from compress.errors import CompressError
from compress.metrics.cost import count_parameters, kv_cache_bytes_per_token, tokens_per_second
from compress.metrics.fidelity import fidelity
from compress.metrics.perplexity import perplexity
from tests.helpers import make_tiny_llama


def test_perplexity_equals_hf_label_loss(tiny_llama):
    stream = torch.randint(0, 128, (100,), generator=torch.Generator().manual_seed(0))
    result = perplexity(tiny_llama, stream, seqlen=32, batch_size=2)  # windows at 0, 32, 64
    losses = []
    with torch.no_grad():
        for start in (0, 32, 64):
            ids = stream[start:start + 32][None]
            losses.append(tiny_llama(ids, labels=ids).loss.double())
    assert result.windows == 3 and result.tokens == 3 * 31
    assert result.perplexity == pytest.approx(math.exp(torch.stack(losses).mean().item()), rel=1e-6)


def test_strided_perplexity_scores_each_token_once(tiny_llama):
    stream = torch.randint(0, 128, (64,), generator=torch.Generator().manual_seed(0))
    result = perplexity(tiny_llama, stream, seqlen=32, stride=16)  # windows at 0, 16, 32
    with torch.no_grad():
        expected = []
        for start in (0, 16, 32):
            ids = stream[start:start + 32][None]
            nll = F.cross_entropy(tiny_llama(ids).logits[0, :-1], ids[0, 1:], reduction="none").double()
            expected.append(nll.mean() if start == 0 else nll[-16:].mean())
    assert result.tokens == 31 + 16 + 16
    assert result.perplexity == pytest.approx(math.exp(torch.stack(expected).mean().item()), rel=1e-6)


@pytest.mark.parametrize("kwargs,match", [(dict(seqlen=0), "seqlen"), (dict(seqlen=8, windows=99), "only"),
                                          (dict(seqlen=8, stride=9), "stride"), (dict(seqlen=500), "fewer")])
def test_bad_protocols(tiny_llama, kwargs, match):
    with pytest.raises(CompressError, match=match):
        perplexity(tiny_llama, torch.arange(100), **kwargs)


def test_fidelity_self_is_zero_and_matches_manual_kl():
    model, other = make_tiny_llama(seed=0), make_tiny_llama(seed=1)
    stream = torch.randint(0, 128, (64,), generator=torch.Generator().manual_seed(0))
    same = fidelity(model, model, stream, seqlen=32)
    assert same.kl_divergence == 0.0 and same.top1_agreement == 1.0 and same.positions == 64
    got = fidelity(other, model, stream, seqlen=32)
    with torch.no_grad():
        ids = stream.view(2, 32)
        p = F.log_softmax(model(ids).logits.double(), -1)
        q = F.log_softmax(other(ids).logits.double(), -1)
    kl = (p.exp() * (p - q)).sum(-1).mean().item()
    agree = (p.argmax(-1) == q.argmax(-1)).double().mean().item()
    assert got.kl_divergence == pytest.approx(kl, rel=1e-9) and got.kl_divergence > 0
    assert got.top1_agreement == pytest.approx(agree)


def test_cost_counts():
    model = make_tiny_llama(tie_word_embeddings=True)
    per_layer = 4 * 64 * 64 * 0 + 64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 96 + 2 * 64
    assert count_parameters(model) == 128 * 64 + 3 * per_layer + 64  # tied lm_head counted once
    assert kv_cache_bytes_per_token(model) == 3 * 2 * 2 * 16 * 4  # layers · (K,V) · kv_heads · head_dim · fp32


def test_tokens_per_second_prefill_keeps_last_logits_only_when_asked():
    """all_logits=False prefills with logits_to_keep=1 (as generate does); decode is unchanged."""
    model = make_tiny_llama()
    shapes = []
    model.register_forward_hook(lambda module, args, out: shapes.append(tuple(out.logits.shape)))
    for all_logits, prefill_rows in ((True, 16), (False, 1)):
        shapes.clear()
        prefill, decode = tokens_per_second(model, prefill_len=16, decode_steps=3, repeats=2, all_logits=all_logits)
        assert prefill > 0 and decode > 0
        assert shapes == [(1, prefill_rows, 128), (1, 1, 128), (1, 1, 128), (1, 1, 128)] * 2


def test_a_quantized_checkpoint_counts_the_weights_it_represents(tmp_path):
    """A packed W4 checkpoint (compressed-tensors, reloaded) holds int32 words, scales and shapes: it
    represents as many weights as the float model, in about a quarter of their bytes."""
    import compress
    from compress.metrics.cost import parameter_bytes

    model = make_tiny_llama(hidden_size=64, intermediate_size=128)
    dense, dense_bytes = count_parameters(model), parameter_bytes(model)
    compress.quantize(model, method="rtn", bits=4, group_size=32, device="cpu")
    reloaded = compress.load(compress.save(model, tmp_path / "q")).model
    assert count_parameters(reloaded) == dense
    linear = sum(m.weight_shape.prod().item() for m in reloaded.modules() if hasattr(m, "weight_packed"))
    float_bytes = 4 * (dense - linear)  # embeddings, norms and lm_head stay float32
    packed = [m for m in reloaded.modules() if hasattr(m, "weight_packed")]
    # 4-bit codes (half a byte each), one float32 scale per 32 weights (the loaded model's dtype), and
    # each module's int64 (out, in) shape
    assert parameter_bytes(reloaded) - float_bytes == linear // 2 + linear // 32 * 4 + 16 * len(packed)
    assert parameter_bytes(reloaded) < dense_bytes
