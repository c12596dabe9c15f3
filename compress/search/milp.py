"""The first search stage: one option per layer under a budget, by a mixed-integer program.

With the additive proxy (every option's score from :mod:`compress.search.profile`) and an additive cost
(parameters, KV bytes or latency per option), the best sub-network under a budget is

    minimise Σ_i Σ_o s_io · x_io   subject to   Σ_o x_io = 1 (each layer one option),
             Σ_i Σ_o c_io · x_io ≤ B,   Σ_i Σ_{o ≠ drop} x_io ≥ min_depth,   x_io ∈ {0, 1},

solved exactly by ``scipy.optimize.milp`` (HiGHS branch and bound).
"""

from __future__ import annotations

import numpy as np

from compress.errors import CompressError
from compress.search.space import Option, SearchSpace


def solve(space: SearchSpace, scores: list[dict[Option, float]], costs: list[dict[Option, float]],
          budget: float, min_depth: int | None = None) -> list[Option] | None:
    """The per-layer options minimising the summed score with summed cost ≤ ``budget``; None if infeasible."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    min_depth = space.min_depth if min_depth is None else min_depth
    options = space.options()
    n_layers, n_opt = len(scores), len(options)
    c = np.array([scores[i][o] for i in range(n_layers) for o in options], dtype=float)
    cost = np.array([costs[i][o] for i in range(n_layers) for o in options], dtype=float)
    one = np.zeros((n_layers, n_layers * n_opt))
    for i in range(n_layers):
        one[i, i * n_opt:(i + 1) * n_opt] = 1
    kept = np.array([0.0 if o == (0, 0) else 1.0 for _ in range(n_layers) for o in options])
    constraints = [LinearConstraint(one, 1, 1), LinearConstraint(cost[None], -np.inf, budget),
                   LinearConstraint(kept[None], min_depth, np.inf)]
    result = milp(c, constraints=constraints, integrality=np.ones_like(c), bounds=Bounds(0, 1),
                  options={"time_limit": 60})
    if result.x is None:
        return None
    x = np.round(result.x).reshape(n_layers, n_opt)
    picks = [options[int(np.argmax(row))] for row in x]
    if any(row.sum() != 1 for row in x):
        raise CompressError("the mixed-integer solver returned an invalid pick")  # pragma: no cover
    return picks


def min_cost(space: SearchSpace, costs: list[dict[Option, float]]) -> float:
    """The lowest total cost the space can reach: the ``min_depth`` layers whose cheapest kept option costs
    least, every other layer dropped (a dropped layer costs nothing)."""
    cheapest = sorted(min(v for o, v in layer.items() if o != (0, 0)) for layer in costs)
    return float(sum(cheapest[:space.min_depth]))


def option_costs(space: SearchSpace, latency: dict | None, kind: str) -> list[dict[Option, float]]:
    """Per layer, the additive cost of each option: parameters, KV bytes or seconds (latency table)."""
    if kind == "params":
        per = {o: float(space.option_parameters(o)) for o in space.options()}
    elif kind == "kv":
        per = {o: float(space.option_kv_bytes(o)) for o in space.options()}
    else:
        t = latency
        per = {o: (0.0 if o == (0, 0) else t["layer_fixed"] + t["attention"][o.a] + t["ffn"][o.f])
               for o in space.options()}
    return [per] * space.depth


def parent_cost(space: SearchSpace, latency: dict | None, kind: str) -> float:
    if kind == "params":
        return float(space.parent_parameters)
    if kind == "kv":
        return float(space.parent_kv_bytes)
    from compress.search.latency import predicted_seconds

    return predicted_seconds(latency, space, space.full_choice())


def fixed_cost(latency: dict | None, kind: str) -> float:
    """The part of the cost no layer option changes (the latency of the embedding, final norm, lm_head)."""
    return latency["fixed"] if kind == "latency" else 0.0


def schedule_choice(space: SearchSpace, budget: float, schedule: str = "log", min_scale: float = 0.25):
    """SlimGPT's structure at ``budget`` (a fraction of the decoder parameters kept) in this space: its
    schedule's per-layer ratios, attention units removed at the layer's ratio and the FFN taking the rest,
    rounded to the space's units and FFN steps (every layer kept). A seed of the search: the structure a
    compensating pruner chooses, so the front is measured against it. None when a layer would be
    emptied."""
    from compress.methods.slimgpt.plan import LayerShape, plan_layer
    from compress.methods.slimgpt.schedule import layer_ratios

    shape = LayerShape(space.hidden, space.heads, space.kv_heads, space.head_dim, space.ffn)
    ratios = layer_ratios(1.0 - budget, [shape.prunable] * space.depth, schedule, min_scale)
    A, F = space.attention_units, space.ffn_options
    choice = []
    for ratio in ratios:
        try:
            plan = plan_layer(ratio, shape, space.unit, prune_attention=space.kind == "full")
        except CompressError:
            return None
        f = min(max(round((space.ffn - plan.channels_removed) / space.ffn_step), 1), F)
        choice.append(Option(A - plan.attention_units if space.kind == "full" else A, f))
    return choice


def first_population(space: SearchSpace, scores, option_costs, budgets: list[float], population: int,
                     parent_cost: float, fixed_cost: float, cost_kind: str) -> list[tuple[list[int], float, str]]:
    """NSGA-II's first genomes, as (genome, budget, origin): the solver's pick for each budget and for
    budgets spread between the lowest and the highest ("milp"), and with a parameter budget SlimGPT's
    log-schedule structure at each of the user's budgets ("slimgpt-log"). At most ``population``: the
    user's budgets' picks first, the spread ones evenly thinned."""
    spread = sorted(set([*budgets, *np.linspace(min(budgets), max(budgets), population).round(4).tolist()]))
    picks: list[tuple[list[int], float, str]] = []
    for budget in spread:
        pick = solve(space, scores, option_costs, budget * parent_cost - fixed_cost)
        if pick is not None and space.encode(pick) not in [g for g, _, _ in picks]:
            picks.append((space.encode(pick), budget, "milp"))
    schedule = []
    if cost_kind == "params":
        for budget in budgets:
            pick = schedule_choice(space, budget)
            if pick is not None and space.encode(pick) not in [g for g, _, _ in picks + schedule]:
                schedule.append((space.encode(pick), budget, "slimgpt-log"))
    if len(picks) + len(schedule) <= population:
        return picks + schedule
    first = [p for p in picks if p[1] in budgets] + schedule
    rest = [p for p in picks if p[1] not in budgets]
    room = max(population - len(first), 0)
    step = len(rest) / max(room, 1)
    return (first + [rest[int(i * step)] for i in range(room)])[:population]


def check_budgets(space: SearchSpace, kind: str, budgets: list[float]) -> None:
    """A clear error when the lowest budget is below what the space can reach (parameters or KV bytes;
    latency is checked once its table is measured: :func:`check_latency_budgets`)."""
    if kind == "params":
        reach = min_cost(space, [{o: space.option_parameters(o) for o in space.options()}] * space.depth)
        reach /= space.parent_parameters
    elif kind == "kv":
        reach = min_cost(space, [{o: space.option_kv_bytes(o) for o in space.options()}] * space.depth)
        reach /= max(space.parent_kv_bytes, 1)
    else:
        return
    low = min(budgets)
    if low < reach - 1e-9:
        raise CompressError(f"--budget {low} is below what the space can reach ({reach:.3f} of the parent's "
                            f"{'decoder parameters' if kind == 'params' else 'KV bytes'} with --min-depth "
                            f"{space.min_depth}); raise it or lower --min-depth")


def check_latency_budgets(space: SearchSpace, table: dict, budgets: list[float]) -> None:
    costs = option_costs(space, table, "latency")
    reach = (fixed_cost(table, "latency") + min_cost(space, costs)) / parent_cost(space, table, "latency")
    if min(budgets) < reach - 1e-9:
        raise CompressError(f"--budget {min(budgets)} is below what the space can reach ({reach:.3f} of the parent's "
                            f"measured latency with --min-depth {space.min_depth}: the embedding and lm_head take "
                            "the rest); raise it or lower --min-depth")
