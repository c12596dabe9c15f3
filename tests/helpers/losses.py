"""Examples and a teacher for the training-loss tests (tests/train/test_losses.py, test_fused_kl.py)."""

import torch

from compress.train.data import IGNORE_INDEX, Example
from tests.helpers import make_tiny_llama


def random_examples(n: int, seed: int = 0, vocab: int = 128) -> list[Example]:
    """Sequences of 10 to 16 random tokens; the first 3 are a prompt (label -100)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(10, 17, (1,), generator=g))
        ids = torch.randint(0, vocab, (length,), generator=g).tolist()
        out.append(Example(ids, [IGNORE_INDEX] * 3 + ids[3:]))
    return out


def peaked_teacher(seed: int = 0):
    """A tiny Llama whose logits have an LLM-like spread (std about 1.6, not 0.16): lm_head × 10.

    A random tiny model is almost uniform over its vocabulary, so a perturbed copy is only ~0.008 nats
    per position away from it; in that corner float32 log-softmax (the loss's precision, as asked)
    agrees with float64 to ~5e-6 relative, not 1e-6. At this spread the KL is ~0.7 nats per position
    and float32 agrees to ~1e-7."""
    model = make_tiny_llama(seed=seed)
    with torch.no_grad():
        model.lm_head.weight.mul_(10.0)
    return model
