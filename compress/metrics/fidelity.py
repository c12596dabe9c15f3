"""Data-free fidelity of a compressed model against its reference (as llama.cpp's KL statistics).

For every scored position: KL(P_ref ‖ P_model) of the next-token distributions, and whether the two
argmax tokens agree. Reported: the mean KL (nats) and the top-1 agreement fraction over all
positions of the same windows the perplexity protocol uses (non-overlapping, from the start).

Both models run once per window and their logits are reduced one vocabulary chunk at a time
(:mod:`compress.metrics.logits`): memory is the two models plus a few (positions × chunk) blocks,
never a window's full logits. :func:`perplexity_and_fidelity` scores the model's perplexity from the
same pass (what ``compress eval --reference`` runs).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch

from compress.metrics.logits import window_stats
from compress.metrics.perplexity import PerplexityResult, next_token_targets, window_starts
from compress.progress import bar


@dataclass
class FidelityResult:
    kl_divergence: float
    top1_agreement: float
    positions: int

    def as_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def perplexity_and_fidelity(model, reference, stream: torch.Tensor, seqlen: int, windows: int | None = None,
                            batch_size: int = 1) -> tuple[PerplexityResult, FidelityResult]:
    """Perplexity of ``model`` (stride = seqlen) and its fidelity to ``reference``, one pass of each
    model over each batch of windows."""
    start_time = time.perf_counter()
    starts = window_starts(stream.numel(), seqlen, seqlen, windows)
    kl_sum = torch.zeros((), dtype=torch.float64)
    agree, positions, losses = 0, 0, []
    progress = bar(f"perplexity and fidelity @ {seqlen}", total=len(starts), unit="win")
    for b in range(0, len(starts), batch_size):
        ids = torch.stack([stream[s:s + seqlen] for s in starts[b:b + batch_size]])  # (b, L)
        nll, kl, agreeing = window_fidelity(model, ids, reference)
        losses.extend(nll)
        kl_sum += kl
        agree += agreeing
        positions += ids.numel()
        progress.update(ids.shape[0])
    progress.close()
    losses = torch.stack(losses)
    ppl = PerplexityResult(perplexity=math.exp(losses.mean().item()), seqlen=seqlen, stride=seqlen,
                           windows=len(losses), tokens=len(losses) * (seqlen - 1),
                           seconds=time.perf_counter() - start_time)
    return ppl, FidelityResult(kl_divergence=(kl_sum / positions).item(), top1_agreement=agree / positions,
                               positions=positions)


@torch.no_grad()
def window_fidelity(model, ids: torch.Tensor, reference) -> tuple[torch.Tensor, torch.Tensor, int]:
    """One batch of windows ``ids`` (b, L): each window's mean next-token loss (b,), the summed
    KL(reference ‖ model) over its b·L positions (float64) and how many of them agree on the top-1 token.
    ``model`` / ``reference`` may be :class:`~compress.metrics.logits.LogitSource` s computed already."""
    stats = window_stats(model, ids, reference=reference, targets=next_token_targets(ids))
    nll = (stats.logsumexp - stats.target_logit).view(ids.shape)[:, :-1]  # (b, L-1)
    return nll.mean(dim=1), stats.kl.sum(), int((stats.argmax == stats.ref_argmax).sum())


def fidelity(model, reference, stream: torch.Tensor, seqlen: int, windows: int | None = None,
             batch_size: int = 1) -> FidelityResult:
    """Mean KL(reference ‖ model) and top-1 agreement over non-overlapping windows."""
    return perplexity_and_fidelity(model, reference, stream, seqlen, windows, batch_size)[1]
