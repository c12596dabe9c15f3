"""Data-free calibration (compress.data.generate_tokens): the batched, KV-cached sampler against a
naive loop that samples one sequence at a time and recomputes the whole prefix at every step."""

from __future__ import annotations

import torch

from compress.data import generate_tokens, generation_batch, sample_seeds
from tests.helpers import make_tiny_llama


def naive(model, samples, seqlen, seed, top_k=50, temperature=1.0):
    """The documented procedure written out: BOS, a uniform first token, then top-k sampling by inverse
    CDF with sample i's own generator, full forward of the prefix (no cache) for each token."""
    rows = []
    for s in sample_seeds(samples, seed):
        g = torch.Generator().manual_seed(s)
        ids = [model.config.bos_token_id, int(torch.randint(0, model.config.vocab_size, (1,), generator=g))]
        while len(ids) < seqlen:
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1]
            values, indices = torch.topk(logits / temperature, top_k)
            cdf = torch.softmax(values, -1).cumsum(-1)
            u = torch.rand((), generator=g, dtype=torch.float32)
            ids.append(int(indices[min(int(torch.searchsorted(cdf, u * cdf[-1])), top_k - 1)]))
        rows.append(ids)
    return torch.tensor(rows)


def test_batched_sampler_gives_the_naive_loops_tokens_for_any_batch_size(one_thread):
    model = make_tiny_llama()
    expected = naive(model, samples=5, seqlen=20, seed=3)
    for batch_size in (None, 1, 2, 5):
        got = generate_tokens(model, None, samples=5, seqlen=20, seed=3, batch_size=batch_size)
        assert torch.equal(got, expected), batch_size
    assert not torch.equal(generate_tokens(model, None, samples=5, seqlen=20, seed=4), expected)
    assert generate_tokens(model, None, samples=2, seqlen=1, seed=3).tolist() == [[model.config.bos_token_id]] * 2


def test_generation_batch_fits_the_kv_budget(one_thread):
    model = make_tiny_llama()  # 3 layers · (K, V) · 2 KV heads · 16 dims · 4 bytes = 768 bytes per token
    assert generation_batch(model, samples=1000, seqlen=512) == 64  # the cap
    assert generation_batch(model, samples=5, seqlen=512) == 5
    assert generation_batch(model, samples=1000, seqlen=2**20) == (768 << 20) // (768 * 2**20)
