"""Benchmark: the cost of data-free calibration (``--data generate``) on smollm2-135m.

Rows, one process, the same model: ``before`` — the former sampler (16 samples per batch, one shared
generator, ``torch.multinomial``, full-vocabulary logits of the last step, the ids grown by
concatenation); ``after`` — :func:`compress.data.generate_tokens` (batch from the KV budget, one
generator per sample, last-position logits only, ids written in place); ``forward`` — one plain
forward over the same number of tokens in batches of 8 (what the walk costs at least). Wall time of
each, best of ``--repeats``.

    python -m evaluation.bench_generate --samples 32 --seqlen 256
"""

from __future__ import annotations

import argparse
import time

import torch

from compress.data import generate_tokens, generation_batch
from compress.models import load_model
from compress.progress import set_progress


@torch.no_grad()
def before(model, samples: int, seqlen: int, seed: int, batch_size: int = 16, top_k: int = 50) -> torch.Tensor:
    """The sampler as it was (compress/data.py before issue 18)."""
    vocab, bos = model.config.vocab_size, model.config.bos_token_id
    generator, out = torch.Generator().manual_seed(seed), []
    for start in range(0, samples, batch_size):
        b = min(batch_size, samples - start)
        first = torch.randint(0, vocab, (b, 1), generator=generator)
        ids = torch.cat([torch.full((b, 1), bos), first], dim=1)[:, :seqlen]
        cache, step_input = None, ids
        while ids.shape[1] < seqlen:
            result = model(input_ids=step_input, cache=cache, use_cache=True)
            cache = result.cache
            top = torch.topk(result.logits[:, -1].float(), top_k, dim=-1)
            pick = torch.multinomial(torch.softmax(top.values, dim=-1), 1, generator=generator)
            step_input = top.indices.gather(1, pick)
            ids = torch.cat([ids, step_input], dim=1)
        out.append(ids)
    return torch.cat(out)


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    set_progress(False)
    model = load_model("smollm2-135m", tokenizer=False).model
    n, L = args.samples, args.seqlen
    tokens = torch.randint(0, model.config.vocab_size, (n, L))
    rows = [("before (batch 16)", best(lambda: before(model, n, L, 0), args.repeats)),
            (f"after (batch {generation_batch(model, n, L)})",
             best(lambda: generate_tokens(model, None, n, L, 0), args.repeats)),
            ("forward, batches of 8", best(lambda: [model(input_ids=tokens[i:i + 8], use_cache=False)
                                                    for i in range(0, n, 8)], args.repeats))]
    print(f"smollm2-135m, {n} samples x {L} tokens, {torch.get_num_threads()} threads")
    for name, seconds in rows:
        print(f"| {name} | {seconds:.1f} s | {n * L / seconds:.0f} tok/s | {seconds / rows[2][1]:.2f}x forward |")


if __name__ == "__main__":
    with torch.no_grad():
        main()
