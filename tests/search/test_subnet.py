"""Sub-networks of the search: views equal exported models, importance is deterministic, scores are exact."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch

from compress.arch import layout
from compress.search.profile import SearchProfile
from compress.search.space import Option, SearchSpace
from compress.search.subnet import materialize, reorder, subnet
from compress.walk import walk
from tests.helpers import make_tiny_llama

IDS = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(5))
TOKENS = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(6))


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def profiled(unit="query", kind="full", layers=4):
    model = make_tiny_llama(num_hidden_layers=layers)
    space = SearchSpace.from_layout(layout(model), kind, unit, ffn_step=32, min_depth=1)
    profile = SearchProfile(space)
    walk(model, TOKENS, [profile], device="cpu", batch_size=2)
    return model, space, profile


CHOICES = [  # tiny Llama: 4 heads in 2 KV groups (query units: 0..2, kv units: 0..2), FFN 96 = 3 steps of 32
    [Option(2, 3), Option(1, 2), Option(0, 1), Option(2, 0)],  # full, narrower, no attention, no MLP
    [Option(1, 1), Option(0, 0), Option(2, 3), Option(0, 0)],  # two dropped layers
]


@pytest.mark.parametrize("unit", ["query", "kv"])
def test_view_equals_materialized_and_reloaded_model(unit, tmp_path, one_thread):
    import compress
    from transformers import AutoModelForCausalLM

    model, space, profile = profiled(unit)
    parent = logits(model)
    reorder(model, space, profile.heads, profile.channels)
    assert torch.allclose(logits(model), parent, atol=1e-5), "reordering must not change the function"
    for k, choice in enumerate(CHOICES):
        with subnet(model, space, choice):
            viewed = logits(model)
        assert torch.allclose(logits(model), parent, atol=1e-5), "the context must put every weight back"

        built = materialize(copy.deepcopy(model), space, choice)
        assert (viewed - logits(built)).abs().max() <= 1e-5
        widths = layout(built)
        expected = [space.widths(o) for o in choice if o != (0, 0)]
        assert [tuple(w) for w in widths.layers] == expected
        from compress.metrics.cost import kv_cache_bytes_per_token  # layers without attention cache nothing

        assert kv_cache_bytes_per_token(built, 2) == space.kv_bytes(choice)
        assert widths.kept_layers == [i for i, o in enumerate(choice) if o != (0, 0)]
        folder = compress.save(built, tmp_path / f"{unit}-{k}")
        reloaded = compress.load(folder).model
        assert (logits(reloaded) - viewed).abs().max() <= 1e-5
        remote = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
        assert (logits(remote) - viewed).abs().max() <= 1e-5


def test_no_attention_layer_generates_with_a_cache(one_thread):
    """A layer without attention keeps the cache's length right: cached greedy decoding equals the
    uncached forward's argmax."""
    model, space, profile = profiled("query")
    reorder(model, space, profile.heads, profile.channels)
    built = materialize(model, space, [Option(0, 2), Option(2, 3), Option(0, 3), Option(1, 1)])
    ids = IDS[:1, :8]
    out = built.generate(ids, max_new_tokens=6, do_sample=False, use_cache=True)
    step = ids
    for _ in range(6):  # no cache: every token from the whole prefix
        nxt = logits(built, step)[:, -1].argmax(-1, keepdim=True)
        step = torch.cat([step, nxt], dim=1)
    assert torch.equal(out, step)


def test_importance_order_is_deterministic(one_thread):
    _, _, first = profiled("query")
    _, _, second = profiled("query")
    assert first.heads == second.heads and first.channels == second.channels
    assert first.scores == second.scores
    # query units sort within each KV group: every group keeps its own heads
    for heads in first.heads.values():
        assert sorted(heads[:2]) == [0, 1] and sorted(heads[2:]) == [2, 3]


@pytest.mark.parametrize("unit", ["query", "kv"])
def test_option_scores_are_the_relative_output_error(unit, one_thread):
    """Each option's score equals Σ‖Y_option − Y‖² / Σ‖Y‖² measured directly: the parent's hidden state
    entering layer i, layer i alone replaced by the option (a view), its output from the full forward."""
    model, space, profile = profiled(unit)
    reorder(model, space, profile.heads, profile.channels)
    with torch.no_grad():
        parent = model(input_ids=TOKENS, output_hidden_states=True, use_cache=False).hidden_states
    full = space.full_choice()
    for i in (0, 2):
        for option in space.options():
            if option == (0, 0):
                y_opt = parent[i]  # a dropped layer passes its input on
            else:
                choice = list(full)
                choice[i] = option
                with subnet(model, space, choice), torch.no_grad():
                    y_opt = model(input_ids=TOKENS, output_hidden_states=True, use_cache=False).hidden_states[i + 1]
            y = parent[i + 1]
            direct = float((y_opt.double() - y.double()).pow(2).sum() / y.double().pow(2).sum())
            score = profile.scores[i][f"{option.a},{option.f}"]
            assert score == pytest.approx(direct, rel=1e-4, abs=1e-9), (i, option)


def test_milp_is_optimal_on_a_brute_forced_case():
    from compress.search.milp import solve

    model = make_tiny_llama(num_hidden_layers=3)
    space = SearchSpace.from_layout(layout(model), "full", "query", ffn_step=48, min_depth=2)
    options = space.options()
    g = torch.Generator().manual_seed(0)
    scores = [{o: (0.0 if o == space.full_choice()[0] else float(torch.rand((), generator=g)) + 0.1 * (o == (0, 0)))
               for o in options} for _ in range(3)]
    costs = [{o: float(space.option_parameters(o)) for o in options}] * 3
    for fraction in (0.3, 0.5, 0.7, 0.9):
        budget = fraction * space.parent_parameters
        best, best_score = None, float("inf")
        for combo in itertools.product(options, repeat=3):
            if sum(costs[i][o] for i, o in enumerate(combo)) > budget or space.kept_depth(list(combo)) < 2:
                continue
            total = sum(scores[i][o] for i, o in enumerate(combo))
            if total < best_score - 1e-12:
                best, best_score = list(combo), total
        pick = solve(space, scores, costs, budget)
        if best is None:
            assert pick is None
            continue
        assert sum(scores[i][o] for i, o in enumerate(pick)) == pytest.approx(best_score, abs=1e-9)
        assert sum(costs[i][o] for i, o in enumerate(pick)) <= budget


def test_slimgpt_schedule_seed_follows_slimgpt_plan():
    """The "slimgpt-log" seed of a parameter budget is SlimGPT's log-schedule plan (the same attention units
    removed per layer, the FFN rounded to the space's steps), keeps every layer and lands near the budget;
    the first population holds it next to the solver's picks."""
    from compress.methods.slimgpt.method import model_shapes
    from compress.methods.slimgpt.plan import plan_model
    from compress.search.milp import first_population, option_costs, schedule_choice

    model = make_tiny_llama(num_hidden_layers=6, hidden_size=64, intermediate_size=192, num_attention_heads=8,
                            num_key_value_heads=2)
    space = SearchSpace.from_layout(layout(model), "full", "query", ffn_step=16, min_depth=3)
    for budget in (0.55, 0.7, 0.85):
        choice = schedule_choice(space, budget)
        plans = plan_model(model_shapes(model), 1 - budget, "log", 0.25, "query")
        assert [space.attention_units - o.a for o in choice] == [p.attention_units for p in plans]
        for o, p in zip(choice, plans):
            assert abs(space.ffn_width(o.f) - (space.ffn - p.channels_removed)) <= space.ffn_step / 2
        assert space.kept_depth(choice) == 6
        kept = (space.parameters(choice) - 6 * 2 * space.hidden) / (space.parent_parameters - 6 * 2 * space.hidden)
        assert kept == pytest.approx(budget, abs=0.03)
    scores = [{o: float(space.option_parameters(o) == 0) for o in space.options()}] * 6
    costs = option_costs(space, None, "params")
    seeds = first_population(space, scores, costs, [0.55, 0.7, 0.85], 8, space.parent_parameters, 0.0, "params")
    assert len(seeds) <= 8 and [origin for _, _, origin in seeds].count("slimgpt-log") == 3
    assert all(origin != "slimgpt-log" for _, _, origin in
               first_population(space, scores, costs, [0.7], 8, space.parent_parameters, 0.0, "kv"))


def test_space_genomes_and_costs():
    model = make_tiny_llama(num_hidden_layers=4)
    lay = layout(model)
    nas = SearchSpace.from_layout(lay, "llama-nas", ffn_step=32)
    assert nas.n_var == 4 and nas.min_depth == 2
    assert nas.decode([0, 3, 1, 2]) == [Option(0, 0), Option(2, 3), Option(2, 1), Option(2, 2)]
    assert nas.parameters(nas.full_choice()) == lay.parameters() + 4 * 2 * lay.hidden
    assert nas.repair([0, 0, 0, 1])[1:3] != [0, 0]  # the central dropped layers come back first
    full = SearchSpace.from_layout(lay, "full", "kv", ffn_step=32)
    assert full.widths(Option(1, 2)) == (2, 1, 64) and full.option_kv_bytes(Option(1, 2)) == 2 * 16 * 2
    q = SearchSpace.from_layout(lay, "full", "query", ffn_step=32)
    assert q.widths(Option(1, 2)) == (2, 2, 64) and q.widths(Option(0, 1)) == (0, 0, 32)


def test_cached_parent_log_probabilities_give_the_same_kl(monkeypatch, one_thread):
    """The evaluator keeps the parent's log-probabilities when they fit; recomputing them per candidate
    (a large calibration set) gives the same KL and perplexity."""
    import compress.search.objectives as objectives

    model, space, profile = profiled("query")
    reorder(model, space, profile.heads, profile.channels)
    choice = CHOICES[0]
    cached = objectives.Evaluator(model, space, TOKENS, batch_size=2)
    assert cached.parent_logp is not None
    monkeypatch.setattr(objectives, "CACHE_BYTES", 0)
    recomputed = objectives.Evaluator(model, space, TOKENS, batch_size=2)
    assert recomputed.parent_logp is None
    a, b = cached.quality(choice), recomputed.quality(choice)
    assert a["kl"] > 1e-4 and a["kl"] == pytest.approx(b["kl"], rel=1e-6)
    assert a["ppl"] == pytest.approx(b["ppl"], rel=1e-6)
