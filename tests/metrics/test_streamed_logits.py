"""Logits streamed over vocabulary chunks (compress/metrics/logits.py) against the dense computation:
KL, top-1, perplexity; one pass of each model per batch of windows; the full-logits fallback."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from compress.metrics.fidelity import fidelity, perplexity_and_fidelity
from compress.metrics.logits import window_stats
from compress.metrics.perplexity import perplexity
from tests.helpers import make_tiny_llama

STREAM = torch.randint(0, 128, (100,), generator=torch.Generator().manual_seed(0))


def dense(model, reference, ids):
    """The former computation: both models' full logits, log-softmax in float64."""
    with torch.no_grad():
        logp = F.log_softmax(model(input_ids=ids, use_cache=False).logits.double(), dim=-1)
        ref_logp = F.log_softmax(reference(input_ids=ids, use_cache=False).logits.double(), dim=-1)
    kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1)
    nll = -logp[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]
    return kl, (logp.argmax(-1) == ref_logp.argmax(-1)), nll


@pytest.mark.parametrize("chunk", [None, 7, 128])  # one chunk, uneven chunks (128 = 18·7 + 2), the whole vocabulary
def test_streamed_stats_equal_the_dense_computation(chunk, one_thread):
    model, reference = make_tiny_llama(seed=1), make_tiny_llama(seed=0)
    ids = STREAM[:96].view(3, 32)
    kl, agree, nll = dense(model, reference, ids)
    targets = torch.cat([ids[:, 1:], ids[:, :1]], dim=1)
    stats = window_stats(model, ids, reference=reference, targets=targets, chunk=chunk)
    # a chunk of the head is its own float32 matmul: logits differ from the full one by ~1e-7 relative
    assert torch.allclose(stats.kl.view(3, 32), kl, atol=1e-7, rtol=0) and kl.min() > 0
    assert torch.equal((stats.argmax == stats.ref_argmax).view(3, 32), agree)
    got_nll = (stats.logsumexp - stats.target_logit).view(3, 32)[:, :-1]
    assert torch.allclose(got_nll, nll, atol=1e-6, rtol=0)


def test_one_pass_gives_the_dense_kl_top1_and_perplexity(one_thread):
    model, reference = make_tiny_llama(seed=1), make_tiny_llama(seed=0)
    calls = {"model": 0, "reference": 0}
    for name, m in (("model", model), ("reference", reference)):
        m.model.register_forward_hook(lambda *a, name=name: calls.__setitem__(name, calls[name] + 1))
    ppl, fid = perplexity_and_fidelity(model, reference, STREAM, seqlen=32, batch_size=2)  # windows 0, 32, 64
    assert calls == {"model": 2, "reference": 2}  # one forward of each model per batch of windows
    kl, agree, _ = dense(model, reference, STREAM[:96].view(3, 32))
    assert fid.positions == 96
    assert fid.kl_divergence == pytest.approx(kl.mean().item(), abs=1e-5, rel=1e-9)
    assert fid.top1_agreement == pytest.approx(agree.double().mean().item(), abs=1e-5)
    with torch.no_grad():  # perplexity from HF's own label loss, per window
        losses = [model(STREAM[s:s + 32][None], labels=STREAM[s:s + 32][None]).loss.double() for s in (0, 32, 64)]
    assert ppl.perplexity == pytest.approx(math.exp(torch.stack(losses).mean().item()), rel=1e-6)
    assert ppl.perplexity == pytest.approx(perplexity(model, STREAM, seqlen=32).perplexity, rel=1e-12)
    assert (ppl.windows, ppl.tokens) == (3, 3 * 31)


def test_a_head_that_is_not_a_plain_linear_falls_back_to_full_logits(one_thread):
    model, reference = make_tiny_llama(seed=1), make_tiny_llama(seed=0)
    kl, agree, _ = dense(model, reference, STREAM[:64].view(2, 32))
    model.lm_head = torch.nn.Sequential(model.lm_head)  # same logits, but not an nn.Linear
    reference.config.logit_scale = 1.0  # a no-op scale keeps the fast path
    got = fidelity(model, reference, STREAM, seqlen=32, windows=2)
    assert got.kl_divergence == pytest.approx(kl.mean().item(), abs=1e-9, rel=0)
    assert got.top1_agreement == agree.double().mean().item()


def test_a_precomputed_reference_source_gives_the_same_stats(one_thread):
    """One reference forward shared by several models (evaluation/bench_distill.py's pass) changes nothing."""
    from compress.metrics.logits import logit_source

    models, reference = [make_tiny_llama(seed=s) for s in (1, 2)], make_tiny_llama(seed=0)
    ids = STREAM[:64].view(2, 32)
    targets = torch.cat([ids[:, 1:], ids[:, :1]], dim=1)
    shared = logit_source(reference, ids)
    for model in models:
        kl, agree, nll = dense(model, reference, ids)
        stats = window_stats(model, ids, reference=shared, targets=targets)
        assert torch.allclose(stats.kl.view(2, 32), kl, atol=1e-7, rtol=0) and kl.min() > 0
        assert torch.equal((stats.argmax == stats.ref_argmax).view(2, 32), agree)
    own = window_stats(shared, ids, reference=shared, targets=targets)  # the reference against itself
    assert own.kl.abs().max() < 1e-9 and torch.equal(own.argmax, own.ref_argmax)
