"""OBS-compensated candidates: the refit equals a float64 least-squares solution computed directly from
the captured inputs, the error formula equals the damped objective, and the view, the materialized model
and the reloaded export compute the same thing."""

from __future__ import annotations

import copy

import pytest
import torch

from compress.arch import layout
from compress.search.compensation import DAMPING, Compensation, damped_factor, residual_errors, sliced_errors
from compress.search.profile import SearchProfile, unit_heads
from compress.search.space import Option, SearchSpace
from compress.search.subnet import materialize, reorder, subnet
from compress.walk import walk
from tests.helpers import make_tiny_llama

TOKENS = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(6))
IDS = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(5))


def profiled(unit: str, candidates: str = "obs"):
    model = make_tiny_llama(num_hidden_layers=4)
    space = SearchSpace.from_layout(layout(model), "full", unit, ffn_step=32, min_depth=1)
    profile = SearchProfile(space, candidates)
    walk(model, TOKENS, [profile], device="cpu", batch_size=2)
    return model, space, profile


def captured_inputs(model, index: int) -> dict[str, torch.Tensor]:
    """The o_proj and down_proj inputs of layer ``index`` in the full forward (float64, tokens × in)."""
    layer = model.model.layers[index]
    seen = {}
    hooks = [layer.self_attn.o_proj.register_forward_pre_hook(lambda m, a: seen.__setitem__("o", a[0])),
             layer.mlp.down_proj.register_forward_pre_hook(lambda m, a: seen.__setitem__("down", a[0]))]
    with torch.no_grad():
        model(input_ids=TOKENS, use_cache=False)
    for h in hooks:
        h.remove()
    return {k: v.reshape(-1, v.shape[-1]).double() for k, v in seen.items()}


def least_squares(weight: torch.Tensor, x: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """The damped least-squares refit of the kept columns S: with H = XᵀX + λ·mean(diag)·I,
    V = W H[:, S] H[S, S]⁻¹ (float64, an explicit inverse)."""
    H = x.t() @ x
    H = H + DAMPING * H.diagonal().mean() * torch.eye(H.shape[0], dtype=H.dtype)
    return weight.double() @ H[:, kept] @ torch.linalg.inv(H[kept][:, kept])


@pytest.mark.parametrize("unit", ["query", "kv"])
def test_refit_equals_a_direct_least_squares_solution(unit, one_thread):
    model, space, profile = profiled(unit)
    reorder(model, space, profile.heads, profile.channels)
    comp = profile.compensation()
    d = space.head_dim
    for i in (0, 3):
        x = captured_inputs(model, i)  # the reordered parent's inputs: the factors' basis
        o, down = model.model.layers[i].self_attn.o_proj.weight, model.model.layers[i].mlp.down_proj.weight
        for a in range(1, space.attention_units):
            kept = torch.tensor([h * d + c for h in unit_heads(space, a) for c in range(d)])
            expected = least_squares(o, x["o"], kept)
            assert torch.allclose(comp.o_weight(i, o, a).double(), expected, rtol=1e-3, atol=1e-4), (i, a)
        for f in range(1, space.ffn_options):
            kept = torch.arange(space.ffn_width(f))
            expected = least_squares(down, x["down"], kept)
            assert torch.allclose(comp.down_weight(i, down, f).double(), expected, rtol=1e-3, atol=1e-4), (i, f)


def test_error_formulas_equal_the_objective_computed_directly():
    """residual_errors: the damped least-squares objective at its optimum, tr((W' − W) H_d (W' − W)ᵀ) with
    W' = [V, 0] and H_d = XᵀX + λ·mean(diag)·I; sliced_errors: ‖W_R X_R‖²."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 24, generator=g, dtype=torch.float64) @ torch.randn(24, 24, generator=g, dtype=torch.float64)
    w = torch.randn(7, 24, generator=g, dtype=torch.float64)
    xtx = x.t() @ x
    sizes = [0, 5, 12, 23, 24]
    L = damped_factor(xtx)
    Hd = xtx + DAMPING * xtx.diagonal().mean() * torch.eye(24, dtype=torch.float64)
    got, sliced = residual_errors(w, L, sizes), sliced_errors(w, xtx, sizes)
    for k, r, s in zip(sizes, got, sliced):
        v = w @ Hd[:, :k] @ torch.linalg.inv(Hd[:k, :k]) if k else w[:, :0]
        delta = torch.cat([v, torch.zeros(7, 24 - k, dtype=torch.float64)], 1) - w
        assert r == pytest.approx(float(((delta @ Hd) * delta).sum()), rel=1e-4, abs=1e-6), k
        assert s == pytest.approx(float((x[:, k:] @ w[:, k:].t()).pow(2).sum()), rel=1e-9, abs=1e-9), k
        assert r <= s * (1 + 1e-6) or k == 0  # the refit never does worse than the slice (k = 0: damping only)


@pytest.mark.parametrize("unit", ["query", "kv"])
def test_compensated_view_equals_materialized_and_reloaded(unit, tmp_path, one_thread):
    import compress

    model, space, profile = profiled(unit)
    reorder(model, space, profile.heads, profile.channels)
    with torch.no_grad():
        parent = model(input_ids=IDS, use_cache=False).logits
    comp = profile.compensation()
    choice = [Option(2, 3), Option(1, 2), Option(0, 1), Option(1, 0)]
    with torch.no_grad():
        with subnet(model, space, choice, comp):
            viewed = model(input_ids=IDS, use_cache=False).logits
        with subnet(model, space, choice):
            sliced = model(input_ids=IDS, use_cache=False).logits
        assert torch.allclose(model(input_ids=IDS, use_cache=False).logits, parent, atol=1e-5)  # put back
        built = materialize(copy.deepcopy(model), space, choice, comp)
        assert (built(input_ids=IDS, use_cache=False).logits - viewed).abs().max() <= 1e-5
    reloaded = compress.load(compress.save(built, tmp_path / unit)).model
    with torch.no_grad():
        assert (reloaded(input_ids=IDS, use_cache=False).logits - viewed).abs().max() <= 1e-5
    assert not torch.allclose(viewed, sliced, atol=1e-4)  # the refit changed the candidate


@pytest.mark.parametrize("unit", ["query", "kv"])
def test_compensated_scores_lower_the_kept_options_by_the_refit_gain(unit, one_thread):
    """Orders are those of the sliced profile; a dropped layer and the whole layer score as before; every
    other option scores at most its slice's score, and some strictly less."""
    _, _, obs = profiled(unit, "obs")
    _, _, plain = profiled(unit, "slice")
    assert obs.heads == plain.heads and obs.channels == plain.channels
    lower = 0
    for i in obs.scores:
        for key, value in obs.scores[i].items():
            a, f = map(int, key.split(","))
            if (a, f) in ((0, 0), (obs.space.attention_units, obs.space.ffn_options)):
                assert value == pytest.approx(plain.scores[i][key], rel=1e-9, abs=1e-12), (i, key)
            else:
                assert value <= plain.scores[i][key] + 1e-12, (i, key)
                lower += value < plain.scores[i][key] - 1e-6
    assert lower > 0


def test_cache_keeps_within_its_byte_budget(one_thread):
    model, space, profile = profiled("query")
    reorder(model, space, profile.heads, profile.channels)
    comp = Compensation(space, profile.factors, cache_bytes=64 * 64 * 4 + 1)  # one down_proj refit at most
    down = model.model.layers[0].mlp.down_proj.weight
    first = comp.down_weight(0, down, 2)
    comp.down_weight(0, down, 1)
    assert comp._bytes <= comp.cache_bytes and len(comp.cache) == 1
    assert torch.equal(comp.down_weight(0, down, 2), first)  # recomputed: the same
