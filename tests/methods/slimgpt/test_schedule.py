"""Incremental Pruning Ratio and the per-layer plans that realise it."""

from __future__ import annotations

import math

import pytest

from compress.errors import CompressError
from compress.methods.slimgpt.plan import LayerShape, plan_layer, plan_model, removed_parameters
from compress.methods.slimgpt.schedule import layer_ratios, weighted_mean


@pytest.mark.parametrize("n", [1, 2, 7, 30, 32, 80])
@pytest.mark.parametrize("kind", ["log", "linear", "uniform"])
def test_parameter_weighted_mean_is_the_target(n, kind):
    weights = [1000 + 37 * (i % 5) for i in range(n)]  # layers of different sizes
    ratios = layer_ratios(0.3, weights, kind, min_scale=0.25)
    mean = sum(r * p for r, p in zip(ratios, weights)) / sum(weights)  # independent of weighted_mean()
    assert mean == pytest.approx(0.3, abs=1e-12)
    assert weighted_mean(ratios, weights) == pytest.approx(0.3, abs=1e-12)
    assert ratios == sorted(ratios)  # deeper layers never pruned less


def test_log_schedule_shape_uses_the_real_depth():
    n = 12
    ratios = layer_ratios(0.2, [1.0] * n, "log", min_scale=0.25)
    r_min, r_max = ratios[0], ratios[-1]
    assert r_min == pytest.approx(0.05)
    for i, r in enumerate(ratios):  # r_i = r_min + (r_max − r_min)·ln(1+i)/ln(n), with ln(n) not ln(32)
        assert r == pytest.approx(r_min + (r_max - r_min) * math.log(1 + i) / math.log(n), abs=1e-12)


SMOL = LayerShape(hidden=576, heads=9, kv_heads=3, head_dim=64, ffn=1536)


@pytest.mark.parametrize("unit", ["query", "kv"])
@pytest.mark.parametrize("ratio", [0.05, 0.2, 0.35, 0.5, 0.7])
def test_layer_plan_meets_its_ratio_to_one_channel(unit, ratio):
    plan = plan_layer(ratio, SMOL, unit)
    removed = removed_parameters(SMOL, plan)
    assert abs(removed - ratio * SMOL.prunable) <= 3 * SMOL.hidden / 2 + 1  # half a channel (3·hidden params)
    if unit == "query":
        assert plan.heads_removed % SMOL.kv_heads == 0 and plan.kv_removed == 0
    else:
        assert plan.heads_removed == 3 * plan.kv_removed
    assert plan.heads_removed < SMOL.heads


def test_model_plan_realises_the_target_for_smollm2_shapes():
    shapes = [SMOL] * 30
    plans = plan_model(shapes, 0.2, "log", 0.25, "query")
    removed = sum(removed_parameters(s, p) for s, p in zip(shapes, plans))
    assert removed / sum(s.prunable for s in shapes) == pytest.approx(0.2, abs=30 * 864 / (30 * SMOL.prunable) + 1e-9)


def test_a_ratio_that_empties_a_layer_is_an_error():
    with pytest.raises(CompressError, match=r"layer \d+ would be emptied: its pruning ratio is"):
        plan_model([SMOL] * 30, 0.9, "log", 0.25, "query")
    with pytest.raises(CompressError, match="would be emptied"):
        plan_model([SMOL] * 30, 0.999, "uniform", 0.25, "query")


def test_no_gqa_prunes_single_heads_with_their_keys():
    mha = LayerShape(hidden=64, heads=4, kv_heads=4, head_dim=16, ffn=96)
    plan = plan_layer(0.5, mha, "query")
    assert plan.unit == "kv" and plan.heads_removed == plan.kv_removed == 2
