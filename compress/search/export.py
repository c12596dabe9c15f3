"""``compress search export``: the chosen sub-network as a model that loads.

The parent is loaded again (the run records what was named and a fingerprint of it, checked), reordered
with the run's importance orders (and given the super-network's trained layers when there are), then:

* by default (``searched``) the candidate as the search scored it: the kept prefixes become real tensors
  (:func:`compress.search.subnet.materialize`), their o_proj / down_proj columns OBS-refit when the search
  scored OBS candidates (the factors re-derived by one walk of the parent on the search's tokens);
  ``none`` is the plain slice, ``obs`` the refit whatever the search scored;
* with ``compensate="slimgpt"`` the dropped layers and the removed attentions / MLPs go first, then a
  SlimGPT walk prunes every layer to exactly the searched widths, choosing the heads and channels by OBS
  and updating the kept o_proj / down_proj columns (search, then compensate); ``"slimgpt-bias"`` runs
  that walk with SlimGPT's bias setting (centred OBS plus an o_proj / down_proj bias);
* with ``distill`` steps the result is trained by knowledge distillation from the parent (KL over the
  full vocabulary, the shared training loop) on calibration text other than the search's.

The output is written by the plain safetensors exporter: a ``compress_llama`` config with per-layer
widths and provenance, reloaded by :func:`compress.load` and ``from_pretrained(trust_remote_code=True)``.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path


from compress.errors import CompressError
from compress.methods.slimgpt.method import SlimGPT
from compress.search.record import read_profile
from compress.search.run import FRONT_FILE, PROFILE_FILE, SEARCH_FILE, SUPERNET_FILE, model_fingerprint
from compress.search.space import Option, SearchSpace

log = logging.getLogger(__name__)
COMPENSATE = ("searched", "none", "obs", "slimgpt", "slimgpt-bias")
# SlimGPT's OBS needs more tokens than the search's KL: its Hessians are hidden × hidden and FFN × FFN
COMPENSATE_SAMPLES, COMPENSATE_SEQLEN = 32, 256


def read_run(run: str | Path) -> tuple[dict, list[dict], dict]:
    run = Path(run)
    paths = [run / SEARCH_FILE, run / FRONT_FILE, run / PROFILE_FILE]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise CompressError(f"{run} is not a finished search folder (no {', '.join(missing)}); "
                            "run compress search first, or --resume it")
    try:
        return tuple(json.loads(p.read_text()) for p in paths)  # type: ignore[return-value]
    except ValueError as exc:
        raise CompressError(f"{run}: a search file is not valid JSON ({exc})") from None


def choose(front: list[dict], objectives: list[str], pick: int | None, budget: float | None) -> dict:
    """The front member ``pick`` (its index in front.json), or the best quality within ``budget``."""
    if (pick is None) == (budget is None):
        raise CompressError("give exactly one of --pick K or --budget B")
    if pick is not None:
        if not 0 <= pick < len(front):
            raise CompressError(f"--pick {pick} is not on the front (0..{len(front) - 1}; see front.json)")
        return front[pick]
    cost = objectives[1]
    within = [r for r in front if r[cost] <= budget + 1e-12]
    if not within:
        raise CompressError(f"no front member costs at most {budget} of the parent's {cost} "
                            f"(the cheapest costs {min(r[cost] for r in front):.3f})")
    return min(within, key=lambda r: r[objectives[0]])


def export_subnet(run: str | Path, out: str | Path, *, pick: int | None = None, budget: float | None = None,
                  compensate: str = "searched", distill: int = 0, distill_lr: float = 1e-4, distill_batch: int = 4,
                  compensate_samples: int = COMPENSATE_SAMPLES, compensate_seqlen: int = COMPENSATE_SEQLEN,
                  model: str | None = None, device: str = "auto", force: bool = False) -> Path:
    from compress.export import check_output_path, release_output
    from compress.models import load_model, resolve_model_path

    if compensate not in COMPENSATE:
        raise CompressError(f"unknown --compensate '{compensate}' (choose {' or '.join(COMPENSATE)})")
    if distill < 0:
        raise CompressError(f"--distill must be ≥ 0 steps, got {distill}")
    search, front, profile = read_run(run)
    member = choose(front, search["objectives"], pick, budget)
    spec = model or search["model"]
    source = resolve_model_path(spec)
    check_output_path(out, [source, spec, run], force, claim=True, wait=False)
    try:
        started = time.perf_counter()
        loaded = load_model(source)
        if model_fingerprint(loaded.model) != search["fingerprint"]:
            raise CompressError(f"{run} was searched on another model ({search['model']}), not {spec}")
        compensate = resolve_compensate(compensate, search)
        compensation = search_compensation(loaded.model, loaded.tokenizer, search, profile, device) \
            if compensate == "obs" else None  # from the parent as loaded: before the reordering
        prepare_parent(loaded.model, search, profile, Path(run))
        built, details = build_searched(loaded.model, loaded.tokenizer, search, profile, member, compensate, distill,
                                        distill_lr, device, source=loaded.path or spec, distill_batch=distill_batch,
                                        compensate_tokens=(compensate_samples, compensate_seqlen),
                                        compensation=compensation)
        from compress.api import save

        record = {"command": "search export", "source": spec,
                  "search": {"run": str(Path(run).resolve()), "pick": member["pick"], "genome": member["genome"],
                             "objectives": {k: member[k] for k in (*search["objectives"], "kl", "ppl", "params")
                                            if k in member}},
                  "compensate": compensate, **details,
                  "metrics": {"seconds": round(time.perf_counter() - started, 1)}}
        return save(built, out, tokenizer=loaded.tokenizer, force=force, record=record, format="safetensors")
    finally:
        release_output(out)


def resolve_compensate(compensate: str, search: dict) -> str:
    """``searched`` → what the search scored (``obs`` or ``none``; a search before OBS candidates: none)."""
    if compensate != "searched":
        return compensate
    return "obs" if search.get("config", {}).get("candidates", "slice") == "obs" else "none"


def search_compensation(model, tokenizer, search: dict, profile: dict, device: str):
    """The OBS factors of a recorded search: one walk of the parent (as loaded, not reordered) on the
    search's own calibration tokens."""
    from compress.search.compensation import profile_factors, profiling_tokens
    from compress.search.run import SearchConfig
    from compress.walk import resolve_device

    space = SearchSpace(**search["space"])
    config = SearchConfig(**{k: v for k, v in search["config"].items() if k in SearchConfig.__dataclass_fields__})
    tokens = profiling_tokens(model, tokenizer, config)
    return profile_factors(model, tokens, space, resolve_device(device), search["config"]["batch_size"],
                           read_profile(profile))


def prepare_parent(model, search: dict, profile: dict, run: Path) -> None:
    """The parent as the search left it: reordered, with the super-network's trained layers if any."""
    from compress.search.subnet import reorder

    space = SearchSpace(**search["space"])
    orders = read_profile(profile)
    reorder(model, space, orders["heads"], orders["channels"])
    if search.get("supernet"):
        from safetensors.torch import load_file

        if not (run / SUPERNET_FILE).is_file():
            raise CompressError(f"{run} lacks {SUPERNET_FILE}, which its search trained")
        missing = model.load_state_dict(load_file(run / SUPERNET_FILE), strict=False)
        if missing.unexpected_keys:
            raise CompressError(f"{run / SUPERNET_FILE} does not fit the model")


def build_searched(model, tokenizer, search: dict, profile: dict, member: dict, compensate: str, distill: int,
                   distill_lr: float, device: str, *, source, distill_batch: int = 4,
                   compensate_tokens: tuple[int, int] = (COMPENSATE_SAMPLES, COMPENSATE_SEQLEN), compensation=None):
    """Front member ``member`` of a search from its prepared parent (reordered, trained; changed in place):
    sliced, OBS-refit with ``compensation`` (``compensate`` obs), or compensated by SlimGPT, then optionally
    distilled from the original parent (``source``). Returns (model, record of how)."""
    from compress.search.subnet import materialize

    space = SearchSpace(**search["space"])
    choice = space.decode(member["genome"])
    if compensate == "obs" and compensation is None:
        raise CompressError("compensate obs needs the search's factors")  # a caller's bug
    if compensate in ("none", "obs"):
        model, details = materialize(model, space, choice, compensation if compensate == "obs" else None), {}
    else:
        model, details = compensate_slimgpt(model, tokenizer, search, space, choice, device, *compensate_tokens,
                                            bias=compensate == "slimgpt-bias")
    if distill:
        details["distill"] = distill_from_parent(model, tokenizer, source, search, distill, distill_lr,
                                                 distill_batch, device)
    model.requires_grad_(False)
    return model, details


def compensate_slimgpt(model, tokenizer, search: dict, space: SearchSpace, choice: list[Option], device: str,
                       samples: int = COMPENSATE_SAMPLES, seqlen: int = COMPENSATE_SEQLEN, bias: bool = False):
    """Drop the layers, remove whole attentions / MLPs, then SlimGPT to exactly the searched widths, on
    ``samples`` × ``seqlen`` tokens of the search's calibration source (its seed). ``bias``: SlimGPT's bias
    setting (OBS on the centred inputs, then an o_proj / down_proj bias that restores the mean output)."""
    from compress.data import calibration_tokens
    from compress.search.subnet import materialize
    from compress.walk import walk

    structural = [Option(o.a and space.attention_units, o.f and space.ffn_options) for o in choice]
    materialize(model, space, structural)  # depth, no-attention and no-MLP layers; widths still full
    kept = [o for o in choice if o != (0, 0)]
    method = FixedWidthSlimGPT([space.widths(o) for o in kept], space.unit, bias=bias)
    method.prepare(model)
    c = search["calibration"]
    tokens = calibration_tokens(model, tokenizer, c["data"], samples, seqlen, c["seed"])
    start = time.perf_counter()
    walk(model, tokens, [method], device=device, batch_size=search["config"]["batch_size"], staged=False)
    return model, {"compensate_seconds": round(time.perf_counter() - start, 1),
                   "compensate_calibration": {"data": c["data"], "samples": samples, "seqlen": seqlen, "seed": c["seed"]}}


class FixedWidthSlimGPT(SlimGPT):
    """SlimGPT with every layer's target widths given (heads, kv_heads, ffn) instead of a schedule."""

    stageable = False  # layers without attention / MLP: every group re-runs its layer

    def __init__(self, widths: list[tuple[int, int, int]], unit: str, bias: bool = False):
        from compress.methods.slimgpt.config import SlimGPTConfig

        super().__init__(SlimGPTConfig(gqa_unit=unit, bias=bias))
        self.targets = widths

    def prepare(self, model):
        from compress.methods.slimgpt.method import model_shapes
        from compress.methods.slimgpt.plan import LayerPlan

        self.shapes = model_shapes(model)
        if len(self.shapes) != len(self.targets):
            raise CompressError(f"{len(self.targets)} target widths for {len(self.shapes)} layers")  # a bug
        plans = []
        for shape, (heads, kv, ffn) in zip(self.shapes, self.targets):
            if shape.heads == 0:  # no attention in this layer (removed before the walk)
                units, heads_removed, kv_removed, unit = 0, 0, 0, self.config.gqa_unit
            elif shape.heads // shape.kv_heads == 1 or self.config.gqa_unit == "kv":
                unit = "kv"
                kv_removed = shape.kv_heads - kv
                units, heads_removed = kv_removed, shape.heads - heads
            else:
                unit = "query"
                units, heads_removed, kv_removed = (shape.heads - heads) // shape.kv_heads, shape.heads - heads, 0
            channels = shape.ffn - ffn if shape.ffn else 0
            removed = shape.cost(heads_removed, kv_removed, channels)
            plans.append(LayerPlan(removed / max(shape.prunable, 1), unit, units, heads_removed, kv_removed, channels))
        self.plans = plans
        return plans


def distill_from_parent(model, tokenizer, source, search: dict, steps: int, lr: float, batch_size: int,
                        device: str) -> dict:
    """Knowledge distillation from the parent (KL, full vocabulary) for ``steps`` optimizer steps."""
    from compress.data import calibration_tokens
    from compress.models import load_model
    from compress.train.data import Example
    from compress.train.loop import TrainConfig, make_accelerator, train
    from compress.train.losses import KLDistillLoss

    c = search["calibration"]
    teacher = load_model(source, tokenizer=False).model.eval()
    tokens = calibration_tokens(teacher, tokenizer, c["data"], steps * batch_size, c["seqlen"], c["seed"] + 2)
    examples = [Example(row.tolist(), row.tolist()) for row in tokens]
    for name, p in model.named_parameters():
        p.requires_grad_(".layers." in name)
    config = TrainConfig(steps=steps, lr=lr, batch_size=batch_size, seed=c["seed"])
    result = train(model, examples, [], config, pad_id=0, accelerator=make_accelerator(1, device),
                   loss=KLDistillLoss(teacher))
    model.eval()
    del teacher
    return {"steps": steps, "lr": lr, "batch_size": batch_size, "tokens": steps * batch_size * c["seqlen"],
            "first_loss": result.train_losses[0][1], "last_loss": result.final_train_loss,
            "seconds": round(result.seconds_per_step * steps, 1)}


__all__ = ["export_subnet", "choose", "read_run", "FixedWidthSlimGPT"]
