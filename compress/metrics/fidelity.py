"""Data-free fidelity of a compressed model against its reference (as llama.cpp's KL statistics).

For every scored position: KL(P_ref ‖ P_model) of the next-token distributions, and whether the two
argmax tokens agree. Reported: the mean KL (nats) and the top-1 agreement fraction over all
positions of the same windows the perplexity protocol uses.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from compress.progress import bar
from compress.metrics.perplexity import window_starts


@dataclass
class FidelityResult:
    kl_divergence: float
    top1_agreement: float
    positions: int

    def as_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def fidelity(model, reference, stream: torch.Tensor, seqlen: int, windows: int | None = None,
             batch_size: int = 1) -> FidelityResult:
    """Mean KL(reference ‖ model) and top-1 agreement over non-overlapping windows."""
    starts = window_starts(stream.numel(), seqlen, seqlen, windows)
    device = next(model.parameters()).device
    ref_device = next(reference.parameters()).device
    kl_sum = torch.zeros((), dtype=torch.float64)
    agree, positions = 0, 0
    progress = bar(f"fidelity @ {seqlen}", total=len(starts), unit="win")
    for b in range(0, len(starts), batch_size):
        ids = torch.stack([stream[s:s + seqlen] for s in starts[b:b + batch_size]])  # (b, L)
        logp = F.log_softmax(model(input_ids=ids.to(device), use_cache=False).logits.double().cpu(), dim=-1)
        ref_logp = F.log_softmax(reference(input_ids=ids.to(ref_device), use_cache=False).logits.double().cpu(), dim=-1)
        kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1)  # (b, L)
        kl_sum += kl.sum()
        agree += (logp.argmax(-1) == ref_logp.argmax(-1)).sum().item()
        positions += kl.numel()
        progress.update(ids.shape[0])
    progress.close()
    return FidelityResult(kl_divergence=(kl_sum / positions).item(), top1_agreement=agree / positions,
                          positions=positions)
