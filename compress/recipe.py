"""Recipes: one YAML file that says the whole job, run by ``compress run RECIPE``.

::

    model: smollm2-135m            # alias, Hugging Face folder or GGUF file
    out: smollm2-slim-w4           # output folder (``--out`` wins)
    dtype: float32                 # float32 | bfloat16 | float16
    device: auto                   # auto | cpu | cuda (``--device`` wins)
    batch_size: 8                  # calibration samples per forward in the walk
    data: {source: wikitext2, samples: 64, seqlen: 256, seed: 0}
    stages:                        # in order; consecutive layer-wise stages share ONE walk
      - {method: slimgpt, options: {ratio: 0.2, ffn_multiple: 64}}
      - {method: gptq, options: {bits: 4, group_size: 64}}
    export: {format: compressed-tensors}   # auto | safetensors | compressed-tensors | gptq
    eval:
      perplexity: {data: wikitext2, seqlen: 2048, windows: 40}   # or a list of such
      fidelity: {reference: smollm2-135m, windows: 8}             # reference defaults to `model`

Parsing only: :func:`parse_recipe` turns the YAML into a :class:`compress.job.Job` and checks
everything that needs no machine (unknown keys, option names and types through each method's
``Config``); the pipeline (:mod:`compress.pipeline`) runs it. Methods are looked up in the registry only.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from compress.config import make_config
from compress.errors import CompressError
from compress.job import (DTYPES, DataSection, ExportSection, FidelitySection, Job, PerplexitySection,  # noqa: F401
                          Stage)
from compress.pipeline import _check_requires
from compress.plugin import LayerMethod, ModelMethod, get_method

TOP_LEVEL_KEYS = ("model", "out", "dtype", "device", "batch_size", "data", "stages", "export", "eval")
Recipe = Job  # a parsed recipe is a job


def _section(config_cls, value, where: str):
    if value is None:
        value = {}
    return make_config(config_cls, value, where=where)


def parse_recipe(text: str, path: str = "<recipe>") -> Job:
    """Parse and validate a recipe's YAML text; every problem is a CompressError naming the key."""
    import yaml

    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise CompressError(f"{path} is not valid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(raw, dict):
        raise CompressError(f"{path}: a recipe is a mapping with 'model' and 'stages', got {type(raw).__name__}")
    unknown = [k for k in raw if k not in TOP_LEVEL_KEYS]
    if unknown:
        raise CompressError(f"{path}: unknown key '{unknown[0]}' (keys: {', '.join(TOP_LEVEL_KEYS)})")
    model = raw.get("model")
    if not isinstance(model, str) or not model:
        raise CompressError(f"{path}: 'model' is missing (an alias, a Hugging Face folder or a GGUF file)")
    out = raw.get("out")
    if out is not None and (not isinstance(out, str) or not out):
        raise CompressError(f"{path}: 'out' must be a folder path, got {out!r}")
    dtype = raw.get("dtype", "float32")
    if dtype not in DTYPES:
        raise CompressError(f"{path}: 'dtype' must be one of {', '.join(DTYPES)}, got {dtype!r}")
    device = raw.get("device", "auto")
    if not isinstance(device, str) or device.split(":")[0] not in ("auto", "cpu", "cuda"):
        raise CompressError(f"{path}: 'device' must be auto, cpu or cuda, got {device!r}")
    batch_size = raw.get("batch_size", 8)
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size <= 0:
        raise CompressError(f"{path}: 'batch_size' must be a positive integer, got {batch_size!r}")
    data = _section(DataSection, raw.get("data"), f"{path}: data")
    stages = _stages(raw.get("stages"), path)
    export = _section(ExportSection, raw.get("export"), f"{path}: export")
    perplexity, fidelity = _eval(raw.get("eval"), path)
    return Job(model=model, stages=stages, out=out, dtype=dtype, device=device, batch_size=batch_size, data=data,
               export=export, perplexity=perplexity, fidelity=fidelity, recipe_text=text, recipe=raw, path=path)


def _stages(value, path: str) -> list[Stage]:
    if not isinstance(value, list) or not value:
        raise CompressError(f"{path}: 'stages' must be a non-empty list of {{method, options}}, got {value!r}")
    stages = []
    for i, item in enumerate(value):
        where = f"{path}: stages[{i}]"
        if not isinstance(item, dict) or "method" not in item:
            raise CompressError(f"{where} must be a mapping with 'method' (and 'options'), got {item!r}")
        extra = [k for k in item if k not in ("method", "options")]
        if extra:
            raise CompressError(f"{where}: unknown key '{extra[0]}' (keys: method, options)")
        name = item["method"]
        try:
            cls = get_method(str(name))
        except CompressError as exc:
            raise CompressError(f"{where}: {exc}") from None
        options = item.get("options") or {}
        method = cls(make_config(cls.Config, options, where=f"{where}: method {name}"))
        if not isinstance(method, (LayerMethod, ModelMethod)):
            raise CompressError(f"{where}: method {name} is neither layer-wise nor whole-model")
        stage = Stage(method, dict(options))
        if isinstance(method, ModelMethod):
            try:
                _check_requires(stage)
            except CompressError as exc:
                raise CompressError(f"{where}: {exc}") from None
        stages.append(stage)
    return stages


def _eval(value, path: str) -> tuple[list[PerplexitySection], FidelitySection | None]:
    if value is None:
        return [], None
    if not isinstance(value, dict):
        raise CompressError(f"{path}: 'eval' must be a mapping with perplexity and/or fidelity, got {value!r}")
    unknown = [k for k in value if k not in ("perplexity", "fidelity")]
    if unknown:
        raise CompressError(f"{path}: eval: unknown key '{unknown[0]}' (keys: perplexity, fidelity)")
    ppl = value.get("perplexity")
    items = [] if ppl is None else ppl if isinstance(ppl, list) else [ppl]
    perplexity = [_section(PerplexitySection, item, f"{path}: eval.perplexity") for item in items]
    fidelity = None
    if value.get("fidelity") is not None:
        fidelity = _section(FidelitySection, value["fidelity"], f"{path}: eval.fidelity")
    return perplexity, fidelity


def load_recipe(path: str | os.PathLike) -> Job:
    path = Path(path)
    if not path.is_file():
        raise CompressError(f"recipe not found: {path}")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise CompressError(f"cannot read recipe {path}: {exc}") from None
    return parse_recipe(text, str(path))


def output_folder(recipe: Job, out: str | None) -> str:
    chosen = out or recipe.out
    if not chosen:
        raise CompressError(f"{recipe.path}: no output folder: add 'out:' to the recipe or pass --out")
    return chosen


def check_without_data(recipe: Job, source: str | os.PathLike | None = None) -> str:
    """Every check of a real run that needs no data, on the model's skeleton (its modules and shapes,
    no weights loaded: :func:`compress.models.load_skeleton`): each layer method's ``prepare`` and the
    export format's ``check_plan``, as :func:`compress.pipeline.prepare` runs them. Returns the format."""
    from compress.models import load_skeleton
    from compress.pipeline import plan

    skeleton = load_skeleton(source if source is not None else recipe.model, DTYPES[recipe.dtype])
    return plan(recipe, skeleton.model)


def describe(recipe: Job, out: str, device: str, fmt: str | None = None) -> list[str]:
    """The validated plan, one line per step (``fmt``: the export format when it is known)."""
    lines = [f"recipe   {recipe.path}", f"model    {recipe.model} ({recipe.dtype})", f"device   {device}"]
    if recipe.needs_calibration:
        d = recipe.data
        lines.append(f"data     {d.source}: {d.samples} samples × {d.seqlen} tokens, seed {d.seed}, "
                     f"batch {recipe.batch_size}")
    for n, step in enumerate(recipe.steps(), 1):
        kind = "one layer walk" if step[0].layerwise else "whole model"
        lines.append(f"step {n}   {' → '.join(s.name for s in step)} ({kind})")
        for stage in step:
            cfg = dataclasses.asdict(stage.method.config)
            lines.append(f"  {stage.name}: " + ", ".join(f"{k}={v}" for k, v in cfg.items()))
    if fmt is None:
        fmt = _planned_format(recipe)
    elif recipe.export.format == "auto":
        fmt = f"auto ({fmt})"
    lines.append(f"export   {fmt}")
    for p in recipe.perplexity:
        lines.append(f"eval     perplexity {p.data} @ {p.seqlen}" + (f", {p.windows} windows" if p.windows else ""))
    if recipe.fidelity:
        f = recipe.fidelity
        lines.append(f"eval     fidelity vs {f.reference or recipe.model} on {f.data} @ {f.seqlen}"
                     + (f", {f.windows} windows" if f.windows else ""))
    lines.append(f"out      {Path(out).expanduser().resolve()}")
    return lines


def _planned_format(recipe: Job) -> str:
    """The export format as far as it is known without the model: a requested one, or the one the
    last method that names an output format needs ("auto" otherwise)."""
    if recipe.export.format != "auto":
        return recipe.export.format
    named = [m.output_format for m in recipe.methods if m.output_format]
    return f"auto ({named[-1]})" if named else "auto"


