"""Incremental Pruning Ratio (SlimGPT §3.3): shallow layers pruned less, deep layers more.

Layer i of n (0-based) gets

    log:     r_i = r_min + (r_max − r_min) · ln(1 + i) / ln(n)
    linear:  r_i = r_min + (r_max − r_min) · i / (n − 1)
    uniform: r_i = target

so r_0 = r_min and r_{n−1} = r_max. We fix r_min = ``min_scale`` · target and solve r_max from the
one linear constraint Σ p_i r_i = target · Σ p_i (p_i: prunable parameters of layer i), so the
parameter-weighted mean is the target for any depth (the public code divides by ln 32 whatever n is).
"""

from __future__ import annotations

import math

from compress.errors import ConfigError


def schedule_shape(kind: str, n: int) -> list[float]:
    """The schedule's shape s_i ∈ [0, 1] with r_i = r_min + (r_max − r_min) · s_i."""
    if n == 1 or kind == "uniform":
        return [0.0] * n
    if kind == "log":
        return [math.log(1 + i) / math.log(n) for i in range(n)]
    if kind == "linear":
        return [i / (n - 1) for i in range(n)]
    raise ConfigError(f"unknown schedule '{kind}' (log, linear or uniform)")


def layer_ratios(target: float, weights: list[float], kind: str = "log", min_scale: float = 0.25) -> list[float]:
    """Per-layer pruning ratios whose ``weights``-weighted mean is ``target``.

    r_min = min_scale · target; r_max = r_min + (target − r_min) · Σp / Σ p_i s_i.
    """
    n = len(weights)
    shape = schedule_shape(kind, n)
    if kind == "uniform" or n == 1:
        return [target] * n
    total = sum(weights)
    weighted_shape = sum(p * s for p, s in zip(weights, shape)) / total  # ∈ (0, 1)
    r_min = min_scale * target
    span = (target - r_min) / weighted_shape  # r_max − r_min
    return [r_min + span * s for s in shape]


def weighted_mean(ratios: list[float], weights: list[float]) -> float:
    return sum(r * p for r, p in zip(ratios, weights)) / sum(weights)
