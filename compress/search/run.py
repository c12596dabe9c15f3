"""``compress search``: the Pareto front of sub-networks of a pretrained LLaMA (LLaMA-NAS).

::

    load ─► calibration tokens ─► profile walk (importance orders, per-layer option scores)
         ─► reorder the parent (function-preserving) ─► [super-network training]
         ─► stage 1: a mixed-integer program per budget on the additive proxy (seeds)
         ─► stage 2: NSGA-II (pymoo) on the real whole-model objectives, seeded with the solver's picks
         ─► stage 3: a local search around each budget's best candidate (compress.search.refine)
         ─► search.json (every candidate), front.json (the non-dominated set), front.png, compress.json

The run folder is the search's checkpoint: ``profile.json`` after the walk, ``supernet.safetensors``
after the super-network training, ``search.json`` after each generation (and refinement round). ``--resume`` replays the
genetic algorithm from its seed with the recorded evaluations (evaluation is the only costly step and
NSGA-II is deterministic given its seed and the objective values), so a resumed search ends with the
same front as an uninterrupted one. Under ``torch.distributed`` (``accelerate launch`` / ``torchrun``)
each process scores its share (candidate k goes to process k mod world) and process 0 writes.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from compress.errors import CompressError
from compress.search import milp
from compress.search.front import pareto_front, plot_front
from compress.search.objectives import Evaluator, check_objectives
from compress.search.record import config_record, differences, model_fingerprint, read_profile, write_json  # noqa: F401  (model_fingerprint: re-exported)
from compress.search.space import SPACES, UNITS, SearchSpace

log = logging.getLogger(__name__)
SEARCH_FILE, FRONT_FILE, PROFILE_FILE, SUPERNET_FILE, PLOT_FILE = (
    "search.json", "front.json", "profile.json", "supernet.safetensors", "front.png")
WINDOW = 0.05  # candidates may cost this much outside [min budget, max budget]


@dataclass
class SearchConfig:
    space: str = "full"
    gqa_unit: str = "query"
    objectives: list[str] = field(default_factory=lambda: ["kl", "params"])
    budgets: list[float] = field(default_factory=lambda: [0.5, 0.7, 0.85])
    population: int = 16
    generations: int = 8
    ffn_step: int | None = None
    min_depth: int | None = None
    data: str = "wikitext2"
    samples: int = 4  # the KL's tokens: long sequences (the model is judged at long context), measured better
    seqlen: int = 512  # than 8 × 128 (evaluation/results/search-smollm2.md)
    batch_size: int = 8
    seed: int = 0
    supernet_steps: int = 0
    supernet_lr: float = 5e-5
    supernet_batch: int = 4
    candidates: str = "obs"  # how a candidate's kept columns are scored: OBS-compensated or plain slices
    # the profiling walk's tokens with OBS candidates (importance, option scores, the refit's Gram matrices):
    # more than the KL's, or the refit fits the scoring tokens themselves (same source and seed)
    obs_samples: int = 32
    obs_seqlen: int = 256
    refine: int = 24  # stage 3: evaluations per budget around its best candidate (compress.search.refine)

    def check(self) -> None:
        check_objectives(self.objectives)
        from compress.search.compensation import CANDIDATES

        if self.candidates not in CANDIDATES:
            raise CompressError(f"unknown --candidates '{self.candidates}' (choose {' or '.join(CANDIDATES)})")
        if self.candidates == "obs":
            from compress.data import check_sizes

            check_sizes(self.obs_samples, self.obs_seqlen)
        if self.space not in SPACES:
            raise CompressError(f"unknown --space '{self.space}' (choose {' or '.join(SPACES)})")
        if self.gqa_unit not in UNITS:
            raise CompressError(f"unknown --gqa-unit '{self.gqa_unit}' (choose query or kv)")
        if self.population < 4:
            raise CompressError(f"--population must be at least 4, got {self.population}")
        if self.refine < 0:
            raise CompressError(f"--refine must be ≥ 0, got {self.refine}")
        if self.generations < 1:
            raise CompressError(f"--generations must be at least 1, got {self.generations}")
        if not self.budgets or any(not 0.0 < b <= 1.0 for b in self.budgets):
            raise CompressError(f"every --budget must be a fraction in (0, 1], got {self.budgets}")
        if self.supernet_steps < 0:
            raise CompressError(f"--supernet-steps must be ≥ 0, got {self.supernet_steps}")
        from compress.data import check_sizes

        check_sizes(self.samples, self.seqlen)


def _rank_world() -> tuple[int, int]:
    """(rank, world) of this process: under torchrun / accelerate launch (WORLD_SIZE > 1 in the environment)
    the process group is started here if the launcher did not (NCCL with CUDA, else gloo)."""
    if not torch.distributed.is_available():
        return 0, 1
    if not torch.distributed.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if torch.cuda.is_available():  # one GPU per process: "cuda" then means this process's own
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class Search:
    """One search run (see the module docstring). ``on_generation(g)`` is called after each generation's
    checkpoint (tests use it to kill a run)."""

    _fingerprint: dict | None = None
    compensation = None  # the OBS factors of the candidates, after run() (None: sliced candidates)

    def __init__(self, model_spec: str, out: str | os.PathLike, config: SearchConfig, *, device: str = "auto",
                 resume: bool = False, on_generation=None, loaded=None, compare: list | None = None):
        self.model_spec, self.out, self.config = str(model_spec), Path(out), config
        self.device, self.resume, self.on_generation = device, resume, on_generation
        self.loaded = loaded
        self.compare = [str(c) for c in compare or []]
        self.rank, self.world = _rank_world()
        self._candidates = lambda: []

    # --- checks before any work ------------------------------------------------------------------
    def preflight(self) -> dict | None:
        """Check the settings and the folder; returns the recorded search when resuming."""
        self.config.check()
        if self.resume:
            path = self.out / SEARCH_FILE
            if not path.is_file():
                raise CompressError(f"--resume: {self.out} holds no {SEARCH_FILE} (not a search folder)")
            try:
                recorded = json.loads(path.read_text())
            except ValueError as exc:
                raise CompressError(f"--resume: {path} is not valid JSON ({exc})") from None
            # settings added since the folder was written count as their defaults
            settings = {**config_record(SearchConfig()), **(recorded.get("config") or {})}
            if settings != config_record(self.config):
                raise CompressError(f"--resume: {self.out} was searched with other settings "
                                    f"({differences(settings, config_record(self.config))}); "
                                    "give the same flags or another --out")
            return recorded
        if self.out.exists() and (not self.out.is_dir() or any(self.out.iterdir())):
            raise CompressError(f"{self.out} already exists and is not empty; choose another --out "
                                "(or --resume to continue the search it holds)")
        return None

    def run(self) -> dict:
        from compress.models import load_model, resolve_model_path
        from compress.walk import resolve_device

        recorded = self.preflight()
        self._previous_seconds = float((recorded or {}).get("seconds") or 0.0)
        self._started = time.perf_counter()
        self._check_compare()
        device = resolve_device(self.device)
        started = time.perf_counter()
        loaded = self.loaded or load_model(resolve_model_path(self.model_spec))
        model, tokenizer = loaded.model, loaded.tokenizer
        fingerprint = model_fingerprint(model)
        if recorded is not None and recorded.get("fingerprint") != fingerprint:
            raise CompressError(f"--resume: {self.out} was searched on another model "
                                f"({recorded.get('model')}), not {self.model_spec}")
        from compress.arch import check_llama_like, layout

        check_llama_like(model)
        c = self.config
        space = SearchSpace.from_layout(layout(model), c.space, c.gqa_unit, c.ffn_step, c.min_depth)
        milp.check_budgets(space, c.objectives[1], c.budgets)
        from compress.data import calibration_tokens

        tokens = calibration_tokens(model, tokenizer, c.data, c.samples, c.seqlen, c.seed)
        from compress.search.compensation import profiling_tokens

        profile_tokens = profiling_tokens(model, tokenizer, c) if c.candidates == "obs" else tokens
        profile, stored, compensation = self._profile(model, profile_tokens, space, device)
        self.compensation = compensation  # the recipe stage exports with it
        if profile.get("latency") is not None:
            milp.check_latency_budgets(space, profile["latency"], c.budgets)
        if self.rank == 0:  # the first file of the run: every check has passed
            self.out.mkdir(parents=True, exist_ok=True)
            if stored is not None:
                write_json(self.out / PROFILE_FILE, stored)
        from compress.search.subnet import reorder

        reorder(model, space, profile["heads"], profile["channels"])
        forward_start = time.perf_counter()
        evaluator = Evaluator(model, space, tokens, c.batch_size, device, profile.get("latency"), compensation)
        forward_seconds = time.perf_counter() - forward_start
        supernet = self._supernet(model, tokenizer, space, device, recorded)
        if compensation is not None:
            compensation.clear()  # weights computed before the super-network training are stale
        scores = profile["scores"]
        record = self._search(space, evaluator, scores, recorded, fingerprint, forward_seconds, supernet)
        record["compare"] = self._reference_points(evaluator)
        finished = recorded is not None and "front" in recorded  # only the final record holds the front
        # over every run that searched; replaying a finished search adds nothing to its wall time
        record["seconds"] = self._previous_seconds if finished else \
            round(self._previous_seconds + time.perf_counter() - started, 1)
        if self.rank == 0:
            write_json(self.out / SEARCH_FILE, record)
            self._finish(record, space)
        return record

    def _check_compare(self) -> None:
        from compress.models import resolve_model_path

        for folder in self.compare:
            resolve_model_path(folder)  # a clear error for a missing or unreadable model, before any work

    def _reference_points(self, evaluator: Evaluator) -> list[dict]:
        """``--compare`` models scored on the same tokens against the same parent (points on front.png)."""
        from compress.models import load_model

        points = []
        for folder in self.compare:
            other = load_model(folder, tokenizer=False).model
            if other.config.vocab_size != evaluator.model.config.vocab_size:
                raise CompressError(f"--compare {folder}: its vocabulary differs from the searched model's")
            points.append({"label": Path(folder).name, "folder": folder, **evaluator.reference_point(other)})
            del other
        return points

    # --- the profiling walk ------------------------------------------------------------------------
    def _profile(self, model, tokens, space: SearchSpace, device) -> tuple[dict, dict | None, object]:
        """(profile, what to store in profile.json or None when it was read from there, the OBS
        compensation of the candidates or None). A resumed run with OBS candidates walks again for the
        factors (not stored: hundreds of MB); the orders and scores are the recorded ones."""
        from compress.search.profile import SearchProfile
        from compress.walk import walk

        path = self.out / PROFILE_FILE
        c = self.config
        if self.resume and path.is_file():
            profile = read_profile(json.loads(path.read_text()))
            if c.candidates == "slice":
                return profile, None, None
            from compress.search.compensation import profile_factors

            return profile, None, profile_factors(model, tokens, space, device, c.batch_size, profile)
        start = time.perf_counter()
        profiler = SearchProfile(space, c.candidates)
        walk(model, tokens, [profiler], device=device, batch_size=self.config.batch_size)
        latency = None
        if "latency" in self.config.objectives:
            import copy

            from compress.search.latency import measure_table
            from compress.search.subnet import reorder

            reordered = copy.deepcopy(model)
            reorder(reordered, space, profiler.heads, profiler.channels)
            latency = measure_table(reordered, space, self.config.seqlen, device)
            del reordered
        stored = {"heads": profiler.heads, "channels": profiler.channels,
                  "scores": [{f"{o.a},{o.f}": profiler.scores[i][f"{o.a},{o.f}"] for o in space.options()}
                             for i in range(space.depth)],
                  "latency": latency, "seconds": round(time.perf_counter() - start, 1)}
        return read_profile(json.loads(json.dumps(stored))), stored, profiler.compensation()

    def _supernet(self, model, tokenizer, space, device, recorded) -> dict | None:
        c = self.config
        if not c.supernet_steps:
            return None
        path = self.out / SUPERNET_FILE
        from safetensors.torch import load_file, save_file

        if self.resume and path.is_file() and recorded is not None and recorded.get("supernet"):
            state = load_file(path)
            model.load_state_dict(state, strict=False)
            return recorded["supernet"]
        import copy

        from compress.data import calibration_tokens
        from compress.models import decoder_layers
        from compress.search.supernet import train_supernet

        teacher = copy.deepcopy(model).eval()
        train_tokens = calibration_tokens(model, tokenizer, c.data, c.supernet_steps * c.supernet_batch, c.seqlen,
                                          c.seed + 1)  # other text than the search's calibration
        summary = train_supernet(model, teacher, space, train_tokens, c.supernet_steps, c.supernet_lr,
                                 c.supernet_batch, c.seed, str(device))
        del teacher
        if self.rank == 0:
            state = {f"model.layers.{i}.{k}": v.detach().contiguous()
                     for i, layer in enumerate(decoder_layers(model)) for k, v in layer.state_dict().items()}
            save_file(state, str(path))
        return summary

    # --- the two stages ----------------------------------------------------------------------------
    def _search(self, space, evaluator: Evaluator, scores, recorded, fingerprint, forward_seconds, supernet) -> dict:
        c = self.config
        cost_kind = c.objectives[1]
        option_costs = milp.option_costs(space, evaluator.latency, cost_kind)
        low, high = max(min(c.budgets) - WINDOW, 0.0), min(max(c.budgets) + WINDOW, 1.0)
        cache: dict[tuple, dict] = {}
        if recorded is not None:
            for cand in recorded.get("candidates", []):
                cache[tuple(cand["genome"])] = cand
        # stage 1: the solver's picks for the budgets and for budgets spread between them, SlimGPT's structure
        stage1 = time.perf_counter()
        seeds = milp.first_population(space, scores, option_costs, c.budgets, c.population,
                                      milp.parent_cost(space, evaluator.latency, cost_kind),
                                      milp.fixed_cost(evaluator.latency, cost_kind), cost_kind)
        stage1_seconds = time.perf_counter() - stage1
        milp_budget = {tuple(g): b for g, b, origin in seeds if origin == "milp"}
        seeded_by = {tuple(g): origin for g, _, origin in seeds}
        self._fingerprint = fingerprint
        self._candidates = lambda: sorted(cache.values(), key=lambda r: (r["generation"], r["genome"]))

        def evaluate(genomes: list[list[int]], generation: int) -> list[dict]:
            todo = [g for g in genomes if tuple(g) not in cache]
            todo = list(dict.fromkeys(tuple(g) for g in todo))
            mine = [g for k, g in enumerate(todo) if k % self.world == self.rank]
            results = {}
            from compress.progress import bar

            progress = bar(f"generation {generation}", total=len(mine), unit="candidate") if self.rank == 0 else None
            for g in mine:
                choice = space.decode(g)
                start = time.perf_counter()
                q = evaluator.quality(choice)
                results[g] = {"genome": list(g), "generation": generation, **q, **evaluator.costs(choice),
                              "proxy": sum(scores[i][o] for i, o in enumerate(choice)),
                              "milp_budget": milp_budget.get(g), "seed": seeded_by.get(g),
                              "seconds": round(time.perf_counter() - start, 2)}
                if progress is not None:
                    progress.update(1)
            if progress is not None:
                progress.close()
            if self.world > 1:
                gathered = [None] * self.world
                torch.distributed.all_gather_object(gathered, results)
                for part in gathered:
                    results.update(part)
            for g in todo:  # in a fixed order, whichever process scored it
                cache[g] = results[g]
            return [cache[tuple(g)] for g in genomes]

        parent_q = evaluator.quality(space.full_choice())  # sanity: KL of the parent to itself is 0
        result = self._nsga(space, evaluate, seeds, low, high, recorded)
        from compress.search.refine import refine

        rounds = refine(space, evaluate, cache, scores, option_costs, c.budgets,
                        milp.parent_cost(space, evaluator.latency, cost_kind),
                        milp.fixed_cost(evaluator.latency, cost_kind), c.objectives[0], cost_kind, c.refine,
                        result["generations"], self._step_done(recorded))
        all_evaluated = list(cache.values())
        front = pareto_front(all_evaluated, c.objectives, low, high)
        return {"version": 1, "model": self.model_spec, "fingerprint": fingerprint, "config": config_record(c),
                "space": space.as_dict(), "objectives": c.objectives, "budgets": c.budgets,
                "calibration": {"data": c.data, "samples": c.samples, "seqlen": c.seqlen, "seed": c.seed,
                                **({"obs_samples": c.obs_samples, "obs_seqlen": c.obs_seqlen}
                                   if c.candidates == "obs" else {})},
                "window": [low, high], "forward_seconds": round(forward_seconds, 2),
                "stage1_seconds": round(stage1_seconds, 2), "parent": {**parent_q, **evaluator.costs(space.full_choice())},
                "supernet": supernet, "generations_done": result["generations"] + rounds, "processes": self.world,
                "candidates": sorted(all_evaluated, key=lambda r: (r["generation"], r["genome"])),
                "front": front}

    def _nsga(self, space, evaluate, seeds, low, high, recorded) -> dict:
        from compress.search.nsga import run_nsga2

        return run_nsga2(space, self.config, evaluate, [g for g, _, _ in seeds], low, high,
                         self._step_done(recorded))

    def _step_done(self, recorded):
        """After a generation (or a refinement round): the checkpoint when it is new, then the hook."""
        done = (recorded or {}).get("generations_done", 0)

        def step_done(generation):
            if self.rank == 0 and generation > done:
                self._checkpoint(generation)
            if self.on_generation is not None:
                self.on_generation(generation)
        return step_done

    def _checkpoint(self, generation: int) -> None:
        """search.json after a generation: what --resume replays."""
        path = self.out / SEARCH_FILE
        # the full record is written at the end; between generations the candidates are what matters
        partial = {"version": 1, "model": self.model_spec, "config": config_record(self.config),
                   "fingerprint": self._fingerprint, "generations_done": generation,
                   "seconds": round(self._previous_seconds + time.perf_counter() - self._started, 1),
                   "candidates": self._candidates()}
        write_json(path, partial)

    def _finish(self, record: dict, space: SearchSpace) -> None:
        write_json(self.out / FRONT_FILE, record["front"])
        try:
            plot_front(record, self.out / PLOT_FILE, record.get("compare"))
        except Exception as exc:  # a plot is a convenience: never lose the search for it
            log.warning("front.png not written: %s", exc)
        from compress.export import write_record

        write_record(self.out, {"command": "search", "source": self.model_spec, "method": "llama-nas",
                                "config": record["config"], "objectives": record["objectives"],
                                "budgets": record["budgets"], "front": record["front"],
                                "calibration": record["calibration"], "parent": record["parent"],
                                "metrics": {"seconds": record["seconds"]}})
