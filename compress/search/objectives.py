"""The whole-model objectives of a candidate: quality on the calibration tokens and its costs.

Quality: KL(parent ‖ candidate) of the next-token distributions, mean over every calibration position
(nats), and the candidate's perplexity of the calibration text (next-token cross-entropy); both are
computed in one forward and recorded. The parent's final hidden states (after its last norm) are kept
once (N·L·H floats) and its logits recomputed chunk by chunk with the shared lm_head, so no
vocabulary-sized tensor is stored.

Costs: decoder-parameter and KV-byte fractions of the parent (exact, from the space), and latency when
a table was measured (:mod:`compress.search.latency`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from compress.search.space import Option, SearchSpace
from compress.search.subnet import subnet

QUALITY = ("kl", "ppl")
CACHE_BYTES = 1 << 30  # the parent's log-probabilities are kept when they fit in this many bytes
COSTS = ("params", "kv", "latency")
ROWS = 1024  # positions per logits chunk


def check_objectives(objectives: list[str]) -> None:
    from compress.errors import CompressError

    if len(objectives) < 2 or objectives[0] not in QUALITY or any(o not in COSTS for o in objectives[1:]) \
            or len(set(objectives)) != len(objectives):
        bad = [o for o in objectives if o not in QUALITY + COSTS]
        why = f"unknown objective '{bad[0]}'" if bad else "give one quality objective then costs"
        raise CompressError(f"{why} in --objectives {','.join(objectives)} (quality: {', '.join(QUALITY)}; "
                            f"costs: {', '.join(COSTS)}; e.g. kl,params)")


class Evaluator:
    """Scores candidates of ``space`` on ``tokens`` (N, L) with the (reordered) parent ``model``."""

    def __init__(self, model, space: SearchSpace, tokens: torch.Tensor, batch_size: int = 8,
                 device: torch.device | str = "cpu", latency: dict | None = None, compensation=None):
        self.model, self.space, self.tokens = model, space, tokens
        self.compensation = compensation  # OBS-compensated candidates (compress.search.compensation)
        self.batch_size, self.device, self.latency = batch_size, torch.device(device), latency
        model.to(self.device).eval()
        self.parent_hidden = [self._final_hidden(batch) for batch in self._batches()]
        # the parent's log-probabilities, chunk by chunk, when they fit (else recomputed per candidate)
        vocab = model.lm_head.out_features
        self.parent_logp = None
        if tokens.numel() * vocab * 4 <= CACHE_BYTES:
            with torch.no_grad():
                self.parent_logp = [[F.log_softmax(model.lm_head(flat[r:r + ROWS]).float(), dim=-1)
                                     for r in range(0, flat.shape[0], ROWS)]
                                    for flat in (h.reshape(-1, h.shape[-1]) for h in self.parent_hidden)]

    def _batches(self):
        for i in range(0, self.tokens.shape[0], self.batch_size):
            yield self.tokens[i:i + self.batch_size].to(self.device)

    @torch.no_grad()
    def _final_hidden(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.model(input_ids=ids, use_cache=False).last_hidden_state

    @torch.no_grad()
    def quality(self, choice: list[Option]) -> dict:
        """{"kl": mean KL(parent ‖ candidate) per position, "ppl": calibration perplexity}."""
        with subnet(self.model, self.space, choice, self.compensation):
            return self._quality(self.model)

    @torch.no_grad()
    def _quality(self, model) -> dict:
        head, parent_head = model.lm_head, self.model.lm_head
        kl_total, nll_total, positions, targets = 0.0, 0.0, 0, 0
        for k, (ids, parent) in enumerate(zip(self._batches(), self.parent_hidden)):
            hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state
            b, length, width = hidden.shape
            flat, flat_parent = hidden.reshape(-1, width), parent.reshape(-1, width)
            nxt = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1).reshape(-1)
            for c, r in enumerate(range(0, flat.shape[0], ROWS)):
                log_q = F.log_softmax(head(flat[r:r + ROWS]).float(), dim=-1)
                log_p = self.parent_logp[k][c] if self.parent_logp is not None else \
                    F.log_softmax(parent_head(flat_parent[r:r + ROWS]).float(), dim=-1)
                kl_total += float(F.kl_div(log_q, log_p, reduction="sum", log_target=True))
                nll_total += float(F.nll_loss(log_q, nxt[r:r + ROWS], ignore_index=-100, reduction="sum"))
            positions += b * length
            targets += b * (length - 1)
        return {"kl": kl_total / positions, "ppl": math.exp(nll_total / max(targets, 1))}

    @torch.no_grad()
    def reference_point(self, model) -> dict:
        """Quality and costs of another compressed model of the same parent (``--compare``), on the same
        tokens: its decoder parameters and KV bytes counted as the space counts a candidate's."""
        from compress.arch import layout
        from compress.metrics.cost import kv_cache_bytes_per_token
        from compress.search.space import KV_BYTES

        lay = layout(model)
        s = self.space
        parameters = lay.parameters() + 2 * lay.hidden * lay.depth  # projections + each layer's two norms
        kv = kv_cache_bytes_per_token(model, KV_BYTES)
        model.to(self.device).eval()
        return {**self._quality(model), "params": parameters / s.parent_parameters,
                "kv": kv / s.parent_kv_bytes if s.parent_kv_bytes else 0.0, "parameters": parameters,
                "depth": lay.depth}

    def costs(self, choice: list[Option]) -> dict:
        s = self.space
        out = {"params": s.parameters(choice) / s.parent_parameters,
               "kv": s.kv_bytes(choice) / s.parent_kv_bytes if s.parent_kv_bytes else 0.0,
               "parameters": s.parameters(choice), "kv_bytes_per_token": s.kv_bytes(choice),
               "depth": s.kept_depth(choice)}
        if self.latency is not None:
            from compress.search.latency import predicted_seconds

            seconds = predicted_seconds(self.latency, s, choice)
            out["latency"] = seconds / predicted_seconds(self.latency, s, s.full_choice())
            out["latency_seconds"] = seconds
        return out
