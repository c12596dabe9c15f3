"""SMART's selection rule: checked against brute force, the published Llama-3.2-1B choice, constructed
sensitivities; and its measurement: each layer's sensitivity is the KL drop of swapping that layer alone."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from compress.distill.smart import (check_k, choose_layers, default_k, evenly_spaced, measure_sensitivities, mean_kl,
                                    rule_bounds, satisfies_rule)
from compress.errors import CompressError


def brute_force(sensitivities, k):
    """Every K-subset, filtered by the rule, best summed sensitivity, ties to the lexicographically smallest."""
    n = len(sensitivities)
    valid = [c for c in itertools.combinations(range(n), k) if satisfies_rule(c, n, k)]
    return list(min(valid, key=lambda c: (-sum(sensitivities[i] for i in c), c)))


@pytest.mark.parametrize("n", range(1, 13))
def test_the_search_equals_brute_force(n):
    rng = random.Random(n)
    for k in range(1, min(n, 5) + 1):
        for trial in range(6):  # integer sensitivities, so ties happen and the tie-break is exercised
            sens = [rng.randint(-3, 6) for _ in range(n)]
            assert choose_layers(sens, k) == brute_force(sens, k), (n, k, sens)


def test_the_rule_spells_out_near_uniform_spacing():
    assert rule_bounds(16, 4) == (3, 5, 12)  # gaps 3..5, the last chosen layer among the final 4
    assert rule_bounds(30, 4) == (6, 9, 22)  # q = 7.5: gaps 6..9, the last layer ≥ 30 − 8
    assert satisfies_rule([0, 5, 10, 14], 16, 4)
    assert not satisfies_rule([0, 5, 10, 11], 16, 4)  # the last layer is too early
    assert not satisfies_rule([0, 6, 10, 14], 16, 4)  # a gap of 6
    assert not satisfies_rule([1, 5, 10, 14], 16, 4)  # the first layer is always MLA
    assert choose_layers([0.0] * 8, 8) == list(range(8))  # K = n: every layer
    assert choose_layers([5.0, 9.0, 1.0], 1) == [0]


def test_published_llama_3_2_1b_choice():
    """Zebra-Llama's 1B: MLA layers [0, 5, 10, 14] of 16. With sensitivities that rise with depth and peak
    at 5, 10 and 14 (SMART's measurements are of this shape: single peaks among a slowly varying
    background), the rule picks exactly that set; evenly spaced placement would be [0, 5, 10, 15]."""
    sens = [0.30, 0.05, 0.06, 0.08, 0.09, 0.40, 0.10, 0.11, 0.12, 0.13, 0.45, 0.14, 0.15, 0.16, 0.50, 0.17]
    assert choose_layers(sens, 4) == [0, 5, 10, 14]
    assert evenly_spaced(16, 4) == [0, 5, 10, 15]


def test_constructed_sensitivities_pick_the_expected_set():
    """30 layers (smollm2-135m), K = 4: gaps 6..9, the last layer ≥ 22. A strong peak outside the allowed
    spacing (layer 3) is passed over; the best reachable peaks (9, 17, 26) win over evenly spaced."""
    sens = [0.0] * 30
    for layer, value in {3: 5.0, 9: 1.0, 17: 1.2, 26: 0.9, 28: 0.3, 14: 0.5}.items():
        sens[layer] = value
    assert choose_layers(sens, 4) == [0, 9, 17, 26]
    assert sum(sens[i] for i in [0, 9, 17, 26]) > sum(sens[i] for i in evenly_spaced(30, 4))


def test_bad_k():
    assert default_k(30) == 4 and default_k(16) == 2 and default_k(3) == 1
    for k in (0, 31, True):
        with pytest.raises(CompressError, match="--n-mla must be between 1 and the model's 30 layers"):
            check_k(k, 30)


class _Shift(torch.nn.Module):
    """A stand-in mixer whose output is a constant shift of its input's scale (known effect on the logits)."""

    def __init__(self, scale):
        super().__init__()
        self.scale = scale

    def forward(self, hidden_states, **kwargs):
        return hidden_states * self.scale, None


def test_measurement_is_the_kl_drop_of_swapping_one_layer(one_thread):
    from tests.helpers.hybrid import tiny_hybrid

    teacher = tiny_hybrid(["attention"] * 3, seed=1)
    student = tiny_hybrid(["attention"] * 3, seed=1)
    for layer in student.model.layers:
        layer.self_attn = _Shift(0.0)  # the "all-Mamba2" student: no token mixing at all
    tokens = torch.randint(0, 128, (3, 16), generator=torch.Generator().manual_seed(0))
    swaps = {i: teacher.model.layers[i].self_attn for i in range(3)}  # "MLA" = the teacher's own mixer
    calls = []
    hook = teacher.model.register_forward_hook(lambda *a: calls.append(1))
    measured = measure_sensitivities(student, teacher, swaps.__getitem__, tokens, batch_size=2, device="cpu")
    hook.remove()
    assert len(calls) == 2  # the teacher ran once per batch (3 windows, batches of 2), not once per swap
    base = mean_kl(student, teacher, tokens, 2, "cpu")  # the teacher recomputed: the same KL
    assert measured["base_kl"] == pytest.approx(base, rel=1e-9) and base > 1e-3
    for i in range(3):
        own = student.model.layers[i].self_attn
        student.model.layers[i].self_attn = swaps[i]
        direct = mean_kl(student, teacher, tokens, 2, "cpu")
        student.model.layers[i].self_attn = own
        assert measured["kl_with_mla"][i] == pytest.approx(direct, rel=1e-9)
        assert measured["sensitivity"][i] == pytest.approx(base - direct, rel=1e-9, abs=1e-12)
    assert all(isinstance(layer.self_attn, _Shift) for layer in student.model.layers)  # every swap undone
