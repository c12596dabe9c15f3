"""The search's third stage (compress.search.refine): the moves it considers, and that on a separable
convex objective its local search reaches the optimum found by brute force."""

from __future__ import annotations

import itertools

import pytest

from compress.search.refine import neighbours, refine
from compress.search.space import Option, SearchSpace

# one gene per layer (llama-nas): FFN steps 1..6 of 16 channels, every layer kept
SPACE = SearchSpace(kind="llama-nas", unit="query", hidden=64, head_dim=16, heads=4, kv_heads=2, ffn=96, depth=4,
                    ffn_step=16, min_depth=4)
WEIGHTS = [1.0, 2.0, 3.0, 5.0]
F = SPACE.ffn_options


def convex_scores() -> list[dict[Option, float]]:
    """Per layer: a convex score falling with the width, heavier in the later layers; dropping is worst."""
    return [{o: (w * (F - o.f) ** 2 if o.f else 1e6) for o in SPACE.options()} for w in WEIGHTS]


def costs() -> list[dict[Option, float]]:
    return [{o: float(SPACE.option_parameters(o)) for o in SPACE.options()}] * SPACE.depth


def fake_search(scores, start: list[int]):
    """An evaluate() as the search's (a cache of rows, each evaluated once) whose objective is the sum of
    the per-layer scores; the cache starts with ``start`` as generation 0."""
    cache, calls = {}, []

    def row(genome, generation):
        choice = SPACE.decode(genome)
        return {"genome": list(genome), "generation": generation, "kl": sum(s[o] for s, o in zip(scores, choice)),
                "params": SPACE.parameters(choice) / SPACE.parent_parameters}

    def evaluate(genomes, generation):
        calls.append([tuple(g) for g in genomes])
        for g in genomes:
            cache.setdefault(tuple(g), row(g, generation))
        return [cache[tuple(g)] for g in genomes]

    cache[tuple(start)] = row(start, 0)
    return cache, calls, evaluate


def test_neighbours_are_single_moves_within_the_limit_ranked_by_the_proxy_change():
    scores, genome = convex_scores(), [6, 2, 1, 1]
    limit = SPACE.parameters(SPACE.decode(genome))
    found = neighbours(SPACE, genome, costs(), scores, limit)
    assert found, "a move that keeps the cost exists (one step from layer 0 to layer 3)"
    base = sum(s[o] for s, o in zip(scores, SPACE.decode(genome)))
    for delta, g in found:
        diff = [b - a for a, b in zip(genome, g)]
        changed = sorted(d for d in diff if d)
        assert changed in ([1], [-1, 1], [-1, 2], [-2, 1]), diff
        assert SPACE.parameters(SPACE.decode(g)) <= limit
        assert delta == pytest.approx(sum(s[o] for s, o in zip(scores, SPACE.decode(g))) - base, abs=1e-9)
    assert [d for d, _ in found] == sorted(d for d, _ in found)
    assert len({tuple(g) for _, g in found}) == len(found)
    # every cost-keeping one-step transfer from layer i to layer j is among them (here: all i ≠ j within bounds)
    transfers = {(i, j) for i in range(4) for j in range(4) if i != j and genome[i] > 1 and genome[j] < F}
    seen = {(d.index(-1), d.index(1)) for _, g in found for d in [[b - a for a, b in zip(genome, g)]]
            if sorted(x for x in d if x) == [-1, 1]}
    assert seen == transfers


def test_local_search_reaches_the_brute_forced_optimum_of_a_separable_convex_objective():
    scores, start = convex_scores(), [6, 2, 1, 1]
    budget = SPACE.parameters(SPACE.decode(start)) / SPACE.parent_parameters
    limit = budget * SPACE.parent_parameters
    best = min(sum(s[o] for s, o in zip(scores, SPACE.decode(list(g))))
               for g in itertools.product(range(1, F + 1), repeat=SPACE.depth)
               if SPACE.parameters(SPACE.decode(list(g))) <= limit)
    cache, calls, evaluate = fake_search(scores, start)
    rounds = refine(SPACE, evaluate, cache, scores, costs(), [budget], SPACE.parent_parameters, 0.0, "kl", "params",
                    steps=200, first_generation=1)
    within = [r for r in cache.values() if r["params"] <= budget + 1e-12]
    assert min(r["kl"] for r in within) == pytest.approx(best, abs=1e-9)
    assert rounds == len(calls) and all(len(c) <= 4 for c in calls)
    assert sum(len(c) for c in calls) <= 200 and len(cache) == 1 + sum(len(c) for c in calls)  # nothing twice


def test_the_evaluations_per_budget_are_capped_and_replay_takes_the_same_steps():
    scores, start = convex_scores(), [6, 2, 1, 1]
    budget = SPACE.parameters(SPACE.decode(start)) / SPACE.parent_parameters
    cache, calls, evaluate = fake_search(scores, start)
    refine(SPACE, evaluate, cache, scores, costs(), [budget], SPACE.parent_parameters, 0.0, "kl", "params",
           steps=6, first_generation=1)
    assert sum(len(c) for c in calls) == 6 and [len(c) for c in calls] == [4, 2]
    # a replay with the whole record already cached (a resumed search) asks for the same genomes in order
    replay_calls = []

    def replay(genomes, generation):
        replay_calls.append([tuple(g) for g in genomes])
        return [cache[tuple(g)] for g in genomes]

    refine(SPACE, replay, dict(cache), scores, costs(), [budget], SPACE.parent_parameters, 0.0, "kl", "params",
           steps=6, first_generation=1)
    assert replay_calls == calls
    assert refine(SPACE, replay, dict(cache), scores, costs(), [budget], SPACE.parent_parameters, 0.0, "kl",
                  "params", steps=0, first_generation=1) == 0
