"""Perplexity with an explicit protocol.

Protocol (the standard one for WikiText-2 raw, and the one the GPTQ and SlimGPT code use): the
test text tokenized once; windows of ``seqlen`` tokens taken every ``stride`` tokens (stride =
seqlen: non-overlapping) from the start; the loss of a window is the mean next-token loss over its
positions (with a smaller stride only the last ``stride`` targets of each window after the first
are scored, so no token is scored twice); perplexity = exp(mean over windows of the window losses).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch

from compress.errors import CompressError
from compress.metrics.logits import window_stats
from compress.progress import bar


@dataclass
class PerplexityResult:
    perplexity: float
    seqlen: int
    stride: int
    windows: int
    tokens: int  # tokens scored
    seconds: float

    def as_dict(self) -> dict:
        return asdict(self)


def window_starts(total: int, seqlen: int, stride: int, windows: int | None) -> list[int]:
    if seqlen <= 0:
        raise CompressError(f"--seqlen must be a positive number of tokens, got {seqlen}")
    if stride <= 0 or stride > seqlen:
        raise CompressError(f"--stride must be in 1..seqlen ({seqlen}), got {stride}")
    if total < seqlen + 0:
        raise CompressError(f"the evaluation text has {total} tokens, fewer than one window of {seqlen}")
    starts = list(range(0, total - seqlen + 1, stride))
    if windows is not None:
        if windows <= 0:
            raise CompressError(f"--windows must be positive, got {windows}")
        if windows > len(starts):
            raise CompressError(f"--windows {windows} asked for, the text has only {len(starts)} windows of {seqlen}")
        starts = starts[:windows]
    return starts


@torch.no_grad()
def window_losses(model, stream: torch.Tensor, seqlen: int, stride: int | None = None, windows: int | None = None,
                  batch_size: int = 1) -> tuple[torch.Tensor, int]:
    """Mean next-token loss of every window (float64 tensor) and the number of tokens scored."""
    stride = stride or seqlen
    starts = window_starts(stream.numel(), seqlen, stride, windows)
    losses, scored = [], 0
    progress = bar(f"perplexity @ {seqlen}", total=len(starts), unit="win")
    for b in range(0, len(starts), batch_size):
        chunk = starts[b:b + batch_size]
        ids = torch.stack([stream[s:s + seqlen] for s in chunk])  # (b, L)
        nll = window_nll(model, ids)  # (b, L-1) float64
        for row, start in enumerate(chunk):
            keep = nll[row] if (start == 0 or stride == seqlen) else nll[row, -stride:]
            losses.append(keep.mean())
            scored += keep.numel()
        progress.update(len(chunk))
    progress.close()
    return torch.stack(losses), scored


def next_token_targets(ids: torch.Tensor) -> torch.Tensor:
    """(b, L): the next token at each position (0 at the last, which has none and is not scored)."""
    return torch.cat([ids[:, 1:], torch.zeros_like(ids[:, :1])], dim=1)


def window_nll(model, ids: torch.Tensor) -> torch.Tensor:
    """Next-token losses (b, L-1) of windows ``ids`` (b, L) in float64, from logits streamed over the
    vocabulary (:mod:`compress.metrics.logits`)."""
    stats = window_stats(model, ids, targets=next_token_targets(ids))
    return (stats.logsumexp - stats.target_logit).view(ids.shape)[:, :-1]


def perplexity(model, stream: torch.Tensor, seqlen: int, stride: int | None = None, windows: int | None = None,
               batch_size: int = 1) -> PerplexityResult:
    """Perplexity of ``model`` on a token stream under the protocol of this module."""
    start = time.perf_counter()
    losses, scored = window_losses(model, stream, seqlen, stride, windows, batch_size)
    return PerplexityResult(perplexity=math.exp(losses.mean().item()), seqlen=seqlen, stride=stride or seqlen,
                            windows=len(losses), tokens=scored, seconds=time.perf_counter() - start)
