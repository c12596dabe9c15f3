"""A tiny search shared by the search tests and their two-process worker."""

from __future__ import annotations

from compress.search.run import Search, SearchConfig

CONFIG = dict(population=6, generations=3, refine=4, ffn_step=32, samples=4, seqlen=32, budgets=[0.5, 0.7, 0.85],
              min_depth=2, batch_size=2, obs_samples=8, obs_seqlen=32)


def tiny_search_folder(folder, tokenizer, layers: int = 4, seed: int = 0):
    """A saved tiny random Llama (4 heads in 2 KV groups, FFN 96) with the smollm2 tokenizer."""
    from tests.helpers import make_tiny_llama

    model = make_tiny_llama(seed=seed, vocab_size=49152, hidden_size=64, intermediate_size=96,
                            num_hidden_layers=layers)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def small_search(model, out, on_generation=None, resume=False, compare=None, **overrides):
    return Search(str(model), out, SearchConfig(**{**CONFIG, **overrides}), device="cpu", resume=resume,
                  on_generation=on_generation, compare=compare).run()
