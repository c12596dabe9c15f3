"""The third search stage: a local search at each budget, on the whole-model objective.

NSGA-II spreads its evaluations over the whole front (a population of 16 covers 0.5–0.9 of the parent),
so near any one budget it tries few structures, and at a tight budget its best member can stay the
seed it started from. This stage spends ``refine`` more evaluations per budget on the neighbourhood of
the best candidate within that budget (lowest quality objective among the candidates evaluated so far):

* a move takes units from one gene and gives units to another — one attention unit or FFN step to
  another layer, one attention unit for two FFN steps or two for one (with the default model's widths
  one query unit costs exactly two 64-channel steps), or only grows one gene where the budget leaves room;
* moves that break the budget, the space's bounds or its minimum depth are skipped, and so are genomes
  already evaluated;
* the rest are ranked by the change of the additive proxy (the per-layer option scores of stage 1),
  ties by genome; the best ``ROUND`` are evaluated, and the best of them replaces the centre when its
  objective is lower. Then the next round from the (new) centre, until the evaluations are spent or no
  move is left.

Everything depends only on evaluated values, so a resumed search (replayed from its record) takes the
same steps, and under ``torch.distributed`` every process takes them together (``evaluate`` gathers).
"""

from __future__ import annotations

ROUND = 4  # candidates evaluated per step of the local search
MOVES = ((1, 1), (1, 2), (2, 1))  # (units taken from one gene, units given to another)


def neighbours(space, genome: list[int], option_costs, scores, limit: float) -> list[tuple[float, list[int]]]:
    """(proxy change, genome) of every move from ``genome`` whose cost (Σ of its layers' option costs) is
    within ``limit``, sorted by proxy change then genome."""
    xl, xu = space.bounds()
    per = space.genes_per_layer
    choice = space.decode(genome)
    base_cost = sum(option_costs[i][o] for i, o in enumerate(choice))
    out: dict[tuple, float] = {}

    def consider(changes: dict[int, int]) -> None:
        g = list(genome)
        for gene, delta in changes.items():
            g[gene] += delta
            if not xl[gene] <= g[gene] <= xu[gene]:
                return
        layers = sorted({gene // per for gene in changes})
        new = space.decode(g)
        cost = base_cost + sum(option_costs[i][new[i]] - option_costs[i][choice[i]] for i in layers)
        if cost > limit + 1e-9 or space.repair(g) != g:
            return
        key = tuple(g)
        if key not in out:
            out[key] = sum(scores[i][new[i]] - scores[i][choice[i]] for i in layers)

    n = len(genome)
    for give in range(n):
        consider({give: 1})
        for take in range(n):
            if take == give:
                continue
            for down, up in MOVES:
                consider({take: -down, give: up})
    return sorted(((delta, list(g)) for g, delta in out.items()), key=lambda t: (t[0], t[1]))


def refine(space, evaluate, cache: dict, scores, option_costs, budgets: list[float], parent_cost: float,
           fixed_cost: float, objective: str, cost_kind: str, steps: int, first_generation: int,
           step_done=None) -> int:
    """Spend ``steps`` evaluations per budget (see the module docstring); returns the rounds taken. Each
    round's candidates are evaluated as generation ``first_generation + round``."""
    if steps <= 0:
        return 0
    generation = first_generation
    for budget in sorted(budgets):
        limit = budget * parent_cost - fixed_cost
        # only what was evaluated before this point counts: a resumed search's cache already holds the
        # candidates of later rounds, and must take the same steps as the uninterrupted run
        within = [r for r in cache.values() if r["generation"] < generation and r[cost_kind] <= budget + 1e-9]
        if not within:
            continue
        centre = min(within, key=lambda r: (r[objective], r["genome"]))
        spent = 0
        while spent < steps:
            moves = [g for _, g in neighbours(space, centre["genome"], option_costs, scores, limit)
                     if tuple(g) not in cache or cache[tuple(g)]["generation"] >= generation]
            batch = moves[:min(ROUND, steps - spent)]
            if not batch:
                break
            rows = evaluate(batch, generation)
            for row in rows:
                row.setdefault("refined_for", budget)
            spent += len(batch)
            generation += 1
            if step_done is not None:
                step_done(generation)
            best = min(rows, key=lambda r: (r[objective], r["genome"]))
            if best[objective] < centre[objective]:
                centre = best
    return generation - first_generation
