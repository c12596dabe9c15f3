"""Next-token statistics streamed over vocabulary chunks, never holding a window's full logits.

A window of ``L`` tokens has ``L × V`` logits (2048 × 49152 in float64 is 800 MB, per model). The
metrics only need, per position, the log-normalizer ``logsumexp(z)``, the argmax, the logit of one
target token and (for fidelity) ``E_p_ref[z_ref − z_model]``; all of them accumulate over chunks of
the vocabulary with the usual running-maximum rescaling, in float64:

    KL(p_ref ‖ p) = Σ_v p_ref(v)·(z_ref(v) − z(v)) − logsumexp(z_ref) + logsumexp(z)
    nll(target)   = logsumexp(z) − z(target)

For a model whose output layer is a plain ``nn.Linear`` on its decoder's last hidden state (the
LLaMA family, pruned or not) only that hidden state is computed by the forward, and the head is
applied one vocabulary chunk at a time. Any other model (a quantized head, logit scaling or
soft-capping) falls back to its full logits, still reduced chunk by chunk in float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from compress.errors import CompressError

CHUNK_ELEMENTS = 1 << 22  # positions × vocabulary rows per chunk: 32 MB per float64 tensor
_TRANSFORMS = ("logit_scale", "final_logit_softcapping", "output_multiplier_scale", "logits_scaling")


@dataclass
class LogitSource:
    """The logits of one forward pass, readable one vocabulary chunk at a time (rows = positions)."""

    hidden: torch.Tensor | None  # (N, H) last hidden states when the head is applied here
    head: nn.Linear | None
    logits: torch.Tensor | None  # (N, V) full logits (fallback)
    vocab: int

    def chunk(self, start: int, stop: int) -> torch.Tensor:
        """Logits of vocabulary rows ``start:stop`` for every position, (N, stop − start) float64."""
        if self.logits is not None:
            return self.logits[:, start:stop].double()
        bias = None if self.head.bias is None else self.head.bias[start:stop]
        return nn.functional.linear(self.hidden, self.head.weight[start:stop], bias).double()


def plain_head(model) -> tuple[nn.Module, nn.Linear] | None:
    """(decoder, head) when logits are exactly ``head(decoder(...).last_hidden_state)``, else None."""
    get_decoder, get_head = getattr(model, "get_decoder", None), getattr(model, "get_output_embeddings", None)
    if get_decoder is None or get_head is None:
        return None
    config = getattr(model, "config", None)
    if any(getattr(config, name, None) not in (None, 1, 1.0) for name in _TRANSFORMS):
        return None
    # a quantized checkpoint (compressed-tensors) or hooks on the top module may do work in the
    # model's own forward that the decoder alone would skip: run the model as it is
    if getattr(config, "quantization_config", None) is not None or model._forward_pre_hooks or model._forward_hooks:
        return None
    decoder, head = get_decoder(), get_head()
    if decoder is None or decoder is model or type(head) is not nn.Linear:
        return None
    return decoder, head


@torch.no_grad()
def logit_source(model, ids: torch.Tensor) -> LogitSource:
    """Run ``model`` on ``ids`` (b, L) once; positions come back flattened to b·L rows."""
    device = next(model.parameters()).device
    ids = ids.to(device)
    plain = plain_head(model)
    if plain is not None:
        decoder, head = plain
        hidden = decoder(input_ids=ids, use_cache=False).last_hidden_state
        return LogitSource(hidden.reshape(-1, hidden.shape[-1]), head, None, head.weight.shape[0])
    logits = model(input_ids=ids, use_cache=False).logits
    return LogitSource(None, None, logits.reshape(-1, logits.shape[-1]), logits.shape[-1])


class _Running:
    """Running max, Σexp(z − max) and argmax of one model's logits, per position."""

    def __init__(self, n: int, device):
        self.max = torch.full((n,), -torch.inf, dtype=torch.float64, device=device)
        self.sum = torch.zeros(n, dtype=torch.float64, device=device)
        self.best = torch.full((n,), -torch.inf, dtype=torch.float64, device=device)
        self.argmax = torch.zeros(n, dtype=torch.long, device=device)

    def add(self, z: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Fold in chunk ``z`` (N, c); return (rescale factor of earlier sums, exp(z − new max))."""
        top, where = z.max(dim=1)
        better = top > self.best  # strict: the first maximal index wins, as torch.argmax
        self.best = torch.where(better, top, self.best)
        self.argmax = torch.where(better, where + start, self.argmax)
        new_max = torch.maximum(self.max, top)
        scale = torch.exp(self.max - new_max)
        weights = torch.exp(z - new_max[:, None])
        self.sum = self.sum * scale + weights.sum(dim=1)
        self.max = new_max
        return scale, weights

    def logsumexp(self) -> torch.Tensor:
        return self.max + torch.log(self.sum)


@dataclass
class WindowStats:
    """Per position (flattened b·L): the model's log-normalizer, argmax and target logit, and with a
    reference its KL to the reference and the reference's argmax."""

    logsumexp: torch.Tensor
    argmax: torch.Tensor
    target_logit: torch.Tensor | None
    kl: torch.Tensor | None = None
    ref_argmax: torch.Tensor | None = None


@torch.no_grad()
def window_stats(model, ids: torch.Tensor, reference=None, targets: torch.Tensor | None = None,
                 chunk: int | None = None) -> WindowStats:
    """One forward of ``model`` (and of ``reference``) on ``ids`` (b, L), reduced over vocabulary chunks.

    ``targets`` (b, L): the token whose logit to keep at each position (any value where unused).
    ``chunk``: vocabulary rows per step (default: about 4M logits per step).
    ``model`` or ``reference`` may be a :class:`LogitSource` already computed on ``ids`` (one reference
    forward shared by several models).
    """
    src = model if isinstance(model, LogitSource) else logit_source(model, ids)
    ref = reference if reference is None or isinstance(reference, LogitSource) else logit_source(reference, ids)
    if ref is not None and ref.vocab != src.vocab:
        raise CompressError(f"the model has {src.vocab} output tokens, the reference {ref.vocab}: "
                            f"fidelity needs the same vocabulary")
    device = (src.hidden if src.hidden is not None else src.logits).device
    n = ids.numel()
    chunk = chunk or max(256, CHUNK_ELEMENTS // n)
    mine = _Running(n, device)
    theirs = _Running(n, device) if ref is not None else None
    expected_gap = torch.zeros(n, dtype=torch.float64, device=device)  # Σ exp(z_ref − max_ref)(z_ref − z)
    flat_targets = None if targets is None else targets.reshape(-1).to(device)
    target_logit = None if targets is None else torch.zeros(n, dtype=torch.float64, device=device)
    for start in range(0, src.vocab, chunk):
        stop = min(start + chunk, src.vocab)
        z = src.chunk(start, stop)
        mine.add(z, start)
        if flat_targets is not None:
            inside = (flat_targets >= start) & (flat_targets < stop)
            picked = z.gather(1, (flat_targets - start).clamp(0, stop - start - 1)[:, None])[:, 0]
            target_logit = torch.where(inside, picked, target_logit)
        if theirs is not None:
            z_ref = ref.chunk(start, stop).to(device)
            scale, weights = theirs.add(z_ref, start)
            expected_gap = expected_gap * scale + (weights * (z_ref - z)).sum(dim=1)
        del z
    lse = mine.logsumexp()
    stats = WindowStats(lse.cpu(), mine.argmax.cpu(), None if target_logit is None else target_logit.cpu())
    if theirs is not None:
        kl = expected_gap / theirs.sum - theirs.logsumexp() + lse
        stats.kl, stats.ref_argmax = kl.cpu(), theirs.argmax.cpu()
    return stats
