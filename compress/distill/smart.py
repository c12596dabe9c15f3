"""SMART (Sensitivity Measure-Aware Replacement of Transformer layers): which layers become MLA.

Two separate parts, so that the rule can be checked exactly on constructed sensitivities:

* **Measurement** (:func:`measure_sensitivities`). Start from the all-Mamba2 student whose mixers are
  the ILD'd ones; its KL divergence to the teacher is KL₀. For every layer i, swap that one layer to its
  ILD'd MLA mixer and measure KL_i. The sensitivity of layer i is s_i = KL₀ − KL_i (how much the KL falls
  when layer i keeps attention-like token mixing). KL(teacher ‖ student) is the mean over positions of
  the full-vocabulary next-token KL (:func:`compress.metrics.logits.window_stats`, float64).
* **Selection** (:func:`choose_layers`). With n layers and K MLA layers (1 ≤ K ≤ n), q = n / K:

  1. the first layer is always MLA (s₁ = 0);
  2. the last chosen layer lies in the final ⌈q⌉ layers (s_K ≥ n − ⌈q⌉);
  3. every gap between consecutive chosen layers is in [max(1, ⌊q⌋ − 1), ⌈q⌉ + 1] (near-uniform);
  4. among the sets that satisfy 1–3, the one with the largest Σ s_i is chosen; ties go to the
     lexicographically smallest set.

  For Llama-3.2-1B (n = 16, K = 4: gaps 3..5, the last layer ≥ 12) the published choice [0, 5, 10, 14]
  is the answer whenever layers 5, 10 and 14 are the sensitivity peaks of their neighbourhoods. A set
  always exists for 1 ≤ K ≤ n (the gaps' reachable sums cover n − ⌈q⌉ .. n − 1). The search is a dynamic
  programme over (chosen count, last layer): O(n·K·(⌈q⌉ − ⌊q⌋ + 3)).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from compress.errors import CompressError


def default_k(layers: int) -> int:
    """The default number of MLA layers: about 13% of the depth, at least one (smollm2-135m: 4 of 30)."""
    return max(1, round(0.13 * layers))


def check_k(k, layers: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= layers:
        raise CompressError(f"--n-mla must be between 1 and the model's {layers} layers, got {k}")
    return k


def rule_bounds(n: int, k: int) -> tuple[int, int, int]:
    """(smallest gap, largest gap, smallest last layer) of the selection rule (module docstring)."""
    check_k(k, n)
    q_floor, q_ceil = n // k, -(-n // k)
    return max(1, q_floor - 1), q_ceil + 1, n - q_ceil


def satisfies_rule(layers: Sequence[int], n: int, k: int) -> bool:
    """Whether ``layers`` (sorted) is one of the near-uniform sets the rule allows."""
    lo, hi, last = rule_bounds(n, k)
    layers = list(layers)
    if len(layers) != k or layers[0] != 0 or layers[-1] < last or layers[-1] > n - 1:
        return False
    return all(lo <= b - a <= hi for a, b in zip(layers, layers[1:]))


def choose_layers(sensitivities: Sequence[float], k: int) -> list[int]:
    """The K layers of the selection rule (module docstring) for per-layer ``sensitivities``."""
    n = len(sensitivities)
    lo, hi, last = rule_bounds(n, k)
    s = [float(v) for v in sensitivities]
    if any(not math.isfinite(v) for v in s):
        raise CompressError("SMART: a layer's sensitivity is not a finite number")
    # best[p]: (score, path) of the best valid prefix whose last chosen layer is p, for the current count
    best: dict[int, tuple[float, tuple[int, ...]]] = {0: (s[0], (0,))}
    for _ in range(k - 1):
        nxt: dict[int, tuple[float, tuple[int, ...]]] = {}
        for p, (score, path) in best.items():
            for gap in range(lo, hi + 1):
                q = p + gap
                if q >= n:
                    break
                cand = (score + s[q], path + (q,))
                if q not in nxt or _better(cand, nxt[q]):
                    nxt[q] = cand
        best = nxt
    finals = [v for p, v in best.items() if p >= last]
    if not finals:  # cannot happen for 1 <= k <= n (see the module docstring); a bug if it does
        raise RuntimeError(f"SMART found no valid set for n={n}, K={k}")
    chosen = finals[0]
    for cand in finals[1:]:
        if _better(cand, chosen):
            chosen = cand
    return list(chosen[1])


def _better(a: tuple[float, tuple[int, ...]], b: tuple[float, tuple[int, ...]]) -> bool:
    """Larger summed sensitivity first, then the lexicographically smaller set."""
    return a[0] > b[0] or (a[0] == b[0] and a[1] < b[1])


def evenly_spaced(n: int, k: int) -> list[int]:
    """K layers spread evenly from the first to the last (the placement SMART is compared with)."""
    check_k(k, n)
    if k == 1:
        return [0]
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})


# ---------------------------------------------------------------- measurement

@torch.no_grad()
def mean_kl(student, teacher, tokens: torch.Tensor, batch_size: int, device, references: list | None = None) -> float:
    """Mean KL(teacher ‖ student) per position over ``tokens`` (N, L), full vocabulary, float64.
    ``references``: the teacher's :class:`~compress.metrics.logits.LogitSource` per batch, when computed
    already (:func:`teacher_sources`)."""
    from compress.metrics.logits import window_stats

    total, count = 0.0, 0
    for b, start in enumerate(range(0, tokens.shape[0], batch_size)):
        ids = tokens[start:start + batch_size].to(device)
        stats = window_stats(student, ids, reference=teacher if references is None else references[b])
        total += float(stats.kl.sum())
        count += stats.kl.numel()
    return total / max(count, 1)


@torch.no_grad()
def teacher_sources(teacher, tokens: torch.Tensor, batch_size: int, device) -> list | None:
    """The teacher's logit sources of every batch, kept for the many KL measurements when they are its
    last hidden states (a plain head: N·L·H floats); None when they would be full logits."""
    from compress.metrics.logits import logit_source

    sources = []
    for start in range(0, tokens.shape[0], batch_size):
        source = logit_source(teacher, tokens[start:start + batch_size].to(device))
        if source.hidden is None:
            return None
        sources.append(source)
    return sources


@torch.no_grad()
def measure_sensitivities(student, teacher, mla_mixer, tokens: torch.Tensor, batch_size: int, device) -> dict:
    """SMART's measurement (module docstring) on the all-Mamba2 ``student``: ``mla_mixer(i)`` gives layer
    i's ILD'd MLA mixer. Each swap is undone before the next. Returns the base KL, each layer's KL with
    its MLA mixer and the sensitivities (base − swapped). The teacher runs once per batch, not per swap."""
    from compress.progress import bar

    student.to(device).eval()
    teacher.to(device).eval()
    references = teacher_sources(teacher, tokens, batch_size, device)
    base = mean_kl(student, teacher, tokens, batch_size, device, references)
    layers = student.model.layers
    swapped: list[float] = []
    progress = bar("SMART: swapping one layer to MLA", total=len(layers), unit="layer")
    try:
        for index, layer in enumerate(layers):
            own = layer.self_attn
            layer.self_attn = mla_mixer(index).to(device)
            try:
                swapped.append(mean_kl(student, teacher, tokens, batch_size, device, references))
            finally:
                layer.self_attn = own
            progress.update(1)
            progress.set_postfix(kl=f"{swapped[-1]:.4f}", base=f"{base:.4f}")
    finally:
        progress.close()
    return {"base_kl": base, "kl_with_mla": swapped, "sensitivity": [base - kl for kl in swapped]}
