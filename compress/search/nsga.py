"""The second search stage: NSGA-II (pymoo) on the whole-model objectives, driven by ask and tell.

The first population is the solver's picks (stage 1), filled with random genomes (repaired to the
space's minimum depth) from a generator seeded by the run's seed. Each generation's genomes are repaired,
scored by ``evaluate`` (which answers from its cache when a genome was already scored: a resumed search
replays the algorithm with the recorded values) and told to the algorithm with two inequality
constraints that keep the first cost inside [low, high].
"""

from __future__ import annotations

import numpy as np


def run_nsga2(space, config, evaluate, seeds: list[list[int]], low: float, high: float, generation_done) -> dict:
    from pymoo.algorithms.moo.nsga2 import NSGA2
    from pymoo.core.evaluator import Evaluator as PymooEvaluator
    from pymoo.core.population import Population
    from pymoo.core.problem import Problem
    from pymoo.operators.crossover.sbx import SBX
    from pymoo.operators.mutation.pm import PM
    from pymoo.operators.repair.rounding import RoundingRepair
    from pymoo.problems.static import StaticProblem

    c = config
    xl, xu = space.bounds()
    problem = Problem(n_var=space.n_var, n_obj=len(c.objectives), n_ieq_constr=2, xl=xl, xu=xu, vtype=int)
    rng = np.random.default_rng(c.seed)
    initial = list(seeds)
    while len(initial) < c.population:  # fill with random genomes (repaired), reproducibly
        genome = space.repair(rng.integers(xl, xu + 1).tolist())
        if genome not in initial:
            initial.append(genome)
    algorithm = NSGA2(pop_size=c.population, sampling=Population.new("X", np.array(initial[:c.population])),
                      crossover=SBX(prob=0.9, eta=15, vtype=float, repair=RoundingRepair()),
                      mutation=PM(eta=20, vtype=float, repair=RoundingRepair()), eliminate_duplicates=True)
    algorithm.setup(problem, termination=("n_gen", c.generations), seed=c.seed, verbose=False)
    generation = 0
    while algorithm.has_next():
        pop = algorithm.ask()
        genomes = [space.repair(x) for x in pop.get("X")]
        pop.set("X", np.array(genomes))
        rows = evaluate(genomes, generation)
        F = np.array([[r[k] for k in c.objectives] for r in rows], dtype=float)
        cost = F[:, 1]
        G = np.stack([low - cost, cost - high], axis=1)
        PymooEvaluator().eval(StaticProblem(problem, F=F, G=G), pop)
        algorithm.tell(infills=pop)
        generation += 1
        generation_done(generation)
    return {"generations": generation}
