"""``nas`` (LLaMA-NAS) as a whole-model method: search, then keep one front member, in a recipe stage.

A recipe (``compress run``) stage ``{method: nas, options: {budget: 0.7, ...}}`` runs the search on
the job's model into ``run_dir`` (default ``<out>.search``, kept: it is the search's checkpoint and its
front), picks the best front member within ``budget``, optionally compensates and distills it as
``compress search export`` does, and hands the sub-network to the next stage or the exporter. The
same settings as the ``compress search`` flags.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from compress.errors import ConfigError
from compress.plugin import ModelMethod, RunContext, config_field, register


@dataclass
class LlamaNASConfig:
    budget: float = config_field(0.7, "The kept sub-network's cost, a fraction of the parent's (first cost objective).")
    budgets: list = config_field([0.5, 0.7, 0.85], "Budgets the search targets (the solver seeds one pick each); "
                                                   "'budget' is added when missing.")
    space: str = config_field("full", "llama-nas (depth, FFN width) or full (also attention width).")
    objectives: list = config_field(["kl", "params"], "Quality (kl or ppl) then costs (params, kv, latency).")
    gqa_unit: str = config_field("query", "Attention unit: query or kv.")
    population: int = config_field(16, "NSGA-II population.")
    generations: int = config_field(8, "NSGA-II generations.")
    refine: int = config_field(24, "Then evaluations per budget of moves around its best candidate (0: none).")
    ffn_step: int | None = config_field(None, "FFN width step (default 64; 256 for FFN ≥ 8192).")
    min_depth: int | None = config_field(None, "Fewest layers kept (default: half).")
    samples: int = config_field(4, "Calibration samples of the search (the KL's tokens).")
    seqlen: int = config_field(512, "Tokens per calibration sample of the search.")
    data: str = config_field("wikitext2", "Calibration text of the search.")
    supernet_steps: int = config_field(0, "Super-network training steps before the search.")
    compensate: str = config_field("searched", "searched (the candidate as scored), none (a plain slice), obs (the "
                                               "search's one-shot OBS refit), slimgpt (SlimGPT's OBS walk at the "
                                               "searched widths) or slimgpt-bias (that walk with SlimGPT's "
                                               "bias setting).")
    candidates: str = config_field("obs", "obs (candidates scored with their kept columns OBS-refit) or slice.")
    obs_samples: int = config_field(32, "With candidates obs: samples of the profiling walk (Gram matrices).")
    obs_seqlen: int = config_field(256, "Tokens per obs_samples sample.")
    compensate_samples: int = config_field(32, "Calibration samples of compensate (the search's data and seed).")
    compensate_seqlen: int = config_field(256, "Tokens per calibration sample of compensate.")
    distill: int = config_field(0, "Steps of knowledge distillation from the parent after the pick.")
    distill_lr: float = config_field(1e-4, "Learning rate of distill.")
    run_dir: str | None = config_field(None, "Search folder (default: <out>.search); --resume style continuation "
                                             "when it holds this search.")

    def __post_init__(self):
        if not 0.0 < self.budget <= 1.0:
            raise ConfigError(f"field 'budget' must be a fraction in (0, 1], got {self.budget}")
        from compress.search.export import COMPENSATE

        if self.compensate not in COMPENSATE:
            raise ConfigError(f"field 'compensate' must be one of {', '.join(COMPENSATE)}, got {self.compensate!r}")
        if self.candidates not in ("obs", "slice"):
            raise ConfigError(f"field 'candidates' must be obs or slice, got {self.candidates!r}")


@register
class LlamaNAS(ModelMethod):
    name = "nas"
    help = "LLaMA-NAS: search the Pareto front of sub-networks, keep the best one within a budget."
    Config = LlamaNASConfig

    def run(self, ctx: RunContext) -> dict:
        import json

        from compress.models import LoadedModel
        from compress.search.export import build_searched, choose, resolve_compensate
        from compress.search.run import PROFILE_FILE, Search, SearchConfig

        c = self.config
        budgets = sorted(set([*c.budgets, c.budget]))
        config = SearchConfig(space=c.space, gqa_unit=c.gqa_unit, objectives=list(c.objectives), budgets=budgets,
                              population=c.population, generations=c.generations, refine=c.refine,
                              ffn_step=c.ffn_step,
                              min_depth=c.min_depth, data=c.data, samples=c.samples, seqlen=c.seqlen,
                              seed=ctx.seed, supernet_steps=c.supernet_steps, candidates=c.candidates,
                              obs_samples=c.obs_samples, obs_seqlen=c.obs_seqlen)
        run_dir = Path(c.run_dir) if c.run_dir else Path(f"{ctx.out}.search") if ctx.out else None
        if run_dir is None:
            raise ConfigError("nas needs a run_dir (or an output folder) for its search files")
        resume = (run_dir / "search.json").is_file()
        loaded = LoadedModel(model=ctx.model, tokenizer=ctx.tokenizer, source=ctx.source or "model", path=None)
        search = Search(ctx.source or "model", run_dir, config, device=str(ctx.device), resume=resume, loaded=loaded)
        record = search.run()
        member = choose(record["front"], record["objectives"], None, c.budget)
        profile = json.loads((run_dir / PROFILE_FILE).read_text())
        compensate = resolve_compensate(c.compensate, record)
        compensation = search.compensation
        if compensate == "obs" and compensation is None:  # the search scored slices: factors of the parent now
            raise ConfigError("compensate: obs needs candidates: obs (the factors come from the search's walk)")
        model, details = build_searched(ctx.model, ctx.tokenizer, record, profile, member, compensate, c.distill,
                                        c.distill_lr, str(ctx.device), source=ctx.source,
                                        compensate_tokens=(c.compensate_samples, c.compensate_seqlen),
                                        compensation=compensation)
        self.picked = {"run_dir": str(run_dir), "pick": member["pick"], "genome": member["genome"],
                       **{k: member[k] for k in ("kl", "ppl", "params", "kv", "depth")}}
        return {"model": model, **self.picked, **details}

    def summary(self) -> dict:
        return getattr(self, "picked", {})
