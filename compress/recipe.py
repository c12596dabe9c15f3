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

Everything is checked before any work (:func:`parse_recipe`): unknown keys, option names and types
(each method's ``Config`` dataclass through :func:`compress.methods.base.make_config`), then the
model and the output folder (:func:`preflight`). Methods are looked up in the registry only.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from compress.errors import CompressError
from compress.methods.base import LayerMethod, Method, ModelMethod, config_field, get_method, make_config

TOP_LEVEL_KEYS = ("model", "out", "dtype", "device", "batch_size", "data", "stages", "export", "eval")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
EXPORT_FORMATS = ("auto", "safetensors", "compressed-tensors", "gptq")
RECIPE_FILE = "recipe.yaml"
# Context that whole-model stages receive as keyword arguments in ``run(model, **context)``.
MODEL_CONTEXT = ("tokenizer", "device", "source", "calibration")


@dataclass
class DataSection:
    source: str = config_field("generate", "Calibration text: generate, wikitext2, c4 or a local path.")
    samples: int = config_field(128, "Calibration samples.")
    seqlen: int = config_field(512, "Tokens per calibration sample.")
    seed: int = config_field(0, "Seed of the calibration windows.")

    def __post_init__(self):
        if self.samples <= 0 or self.seqlen <= 0:
            raise CompressError(f"samples and seqlen must be positive, got {self.samples} × {self.seqlen}")


@dataclass
class ExportSection:
    format: str = config_field("auto", "auto (quantized formats when a stage quantized, else safetensors), "
                                       "safetensors, compressed-tensors or gptq.")

    def __post_init__(self):
        if self.format not in EXPORT_FORMATS:
            raise CompressError(f"field 'format' must be one of {', '.join(EXPORT_FORMATS)}, got {self.format!r}")


@dataclass
class PerplexitySection:
    data: str = config_field("wikitext2", "Evaluation text.")
    seqlen: int = config_field(2048, "Tokens per window.")
    windows: int | None = config_field(None, "Score only the first K windows.")
    stride: int | None = config_field(None, "Window stride (default: seqlen).")
    batch_size: int = config_field(1, "Windows per forward.")

    def __post_init__(self):
        if self.seqlen <= 0 or (self.windows is not None and self.windows <= 0) or self.batch_size <= 0:
            raise CompressError("seqlen, windows and batch_size must be positive")


@dataclass
class FidelitySection:
    reference: str | None = config_field(None, "Reference model (default: the recipe's model).")
    data: str = config_field("wikitext2", "Evaluation text.")
    seqlen: int = config_field(2048, "Tokens per window.")
    windows: int | None = config_field(None, "Score only the first K windows.")
    batch_size: int = config_field(1, "Windows per forward.")

    def __post_init__(self):
        if self.seqlen <= 0 or (self.windows is not None and self.windows <= 0) or self.batch_size <= 0:
            raise CompressError("seqlen, windows and batch_size must be positive")


@dataclass
class Stage:
    method: Method
    options: dict

    @property
    def name(self) -> str:
        return self.method.name

    @property
    def layerwise(self) -> bool:
        return isinstance(self.method, LayerMethod)


@dataclass
class Recipe:
    text: str
    path: str
    model: str
    out: str | None
    dtype: str
    device: str
    batch_size: int
    data: DataSection
    stages: list[Stage]
    export: ExportSection
    perplexity: list[PerplexitySection] = field(default_factory=list)
    fidelity: FidelitySection | None = None
    raw: dict = field(default_factory=dict)

    def steps(self) -> list[list[Stage]]:
        """Stages grouped into steps: a run of consecutive layer-wise stages is one walk."""
        steps: list[list[Stage]] = []
        for stage in self.stages:
            if stage.layerwise and steps and steps[-1][0].layerwise:
                steps[-1].append(stage)
            else:
                steps.append([stage])
        return steps

    @property
    def needs_calibration(self) -> bool:
        return any(s.layerwise for s in self.stages)


def _section(config_cls, value, where: str):
    if value is None:
        value = {}
    return make_config(config_cls, value, where=where)


def parse_recipe(text: str, path: str = "<recipe>") -> Recipe:
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
    return Recipe(text=text, path=path, model=model, out=out, dtype=dtype, device=device, batch_size=batch_size,
                  data=data, stages=stages, export=export, perplexity=perplexity, fidelity=fidelity, raw=raw)


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
        if isinstance(method, ModelMethod):
            _check_context(method, where)
        stages.append(Stage(method, dict(options)))
    return stages


def _check_context(method: ModelMethod, where: str) -> None:
    """A whole-model method whose run() needs more than the recipe context cannot run from a recipe."""
    params = inspect.signature(method.run).parameters.values()
    missing = [p.name for p in params if p.default is inspect.Parameter.empty and p.name != "model"
               and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name not in MODEL_CONTEXT]
    if missing:
        raise CompressError(f"{where}: method {method.name} needs {', '.join(missing)}, which a recipe does not "
                            f"provide (it gives {', '.join(MODEL_CONTEXT)}); use its own command")


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


def load_recipe(path: str | os.PathLike) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise CompressError(f"recipe not found: {path}")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise CompressError(f"cannot read recipe {path}: {exc}") from None
    return parse_recipe(text, str(path))


def output_folder(recipe: Recipe, out: str | None) -> str:
    chosen = out or recipe.out
    if not chosen:
        raise CompressError(f"{recipe.path}: no output folder: add 'out:' to the recipe or pass --out")
    return chosen


def describe(recipe: Recipe, out: str, device: str) -> list[str]:
    """The validated plan, one line per step."""
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
    lines.append(f"export   {recipe.export.format}")
    for p in recipe.perplexity:
        lines.append(f"eval     perplexity {p.data} @ {p.seqlen}" + (f", {p.windows} windows" if p.windows else ""))
    if recipe.fidelity:
        f = recipe.fidelity
        lines.append(f"eval     fidelity vs {f.reference or recipe.model} on {f.data} @ {f.seqlen}"
                     + (f", {f.windows} windows" if f.windows else ""))
    lines.append(f"out      {Path(out).expanduser().resolve()}")
    return lines


def preflight(recipe: Recipe, out: str, force: bool) -> Path:
    """The checks that need the machine: the model resolves, the output folder is free and not the input."""
    from compress.export import check_output_path
    from compress.models import resolve_model_path

    source = resolve_model_path(recipe.model)
    check_output_path(out, [source, recipe.model], force)
    return source


# ----------------------------------------------------------------------------------------------- running


@dataclass
class RunResult:
    folder: Path
    record: dict
    steps: list[dict]  # per stage: method, kind, walk, seconds
    metrics: dict
    parameters: tuple[int, int]
    walks: int = 0


def _unique_parameters(model: torch.nn.Module) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel()
    return total


def run_recipe(recipe: Recipe, out: str, *, force: bool = False, device: str = "auto",
               source: Path | None = None) -> RunResult:
    """Do the whole job: load, stages (one walk per run of layer-wise stages), export, evaluate."""
    from compress import walk as walk_module
    from compress.data import calibration_tokens
    from compress.models import check_llama_like, load_model

    source = source or preflight(recipe, out, force)
    dev = walk_module.resolve_device(device)
    loaded = load_model(source, dtype=DTYPES[recipe.dtype])
    model = loaded.model
    if recipe.needs_calibration:
        check_llama_like(model)
    streams = prepare_eval(recipe, loaded.tokenizer)  # eval data and windows checked before the long work
    before = _unique_parameters(model)
    context: dict[str, Any] = {"tokenizer": loaded.tokenizer, "device": dev, "source": str(source),
                               "calibration": None}
    steps, layers, stage_records = [], [], []
    walks = 0
    tokens = None
    for step in recipe.steps():
        start = time.perf_counter()
        if step[0].layerwise:
            methods = [s.method for s in step]
            for method in methods:
                method.prepare(model)  # plans every layer and fails before the walk where it can
            if tokens is None:
                d = recipe.data
                tokens = calibration_tokens(model, loaded.tokenizer, d.source, d.samples, d.seqlen, d.seed)
                context["calibration"] = tokens
            result = walk_module.walk(model, tokens, methods, device=dev, batch_size=recipe.batch_size)
            walks += 1
            layers.extend({"walk": walks, **r} for r in result.records)
            seconds = time.perf_counter() - start
            for s in step:
                steps.append({"method": s.name, "kind": "layer", "walk": walks, "seconds": round(seconds, 2)})
                stage_records.append({"method": s.name, "config": s.method.config, "walk": walks})
        else:
            stage = step[0]
            out_record = stage.method.run(model, **context) or {}
            if isinstance(out_record.get("model"), torch.nn.Module):
                model = out_record["model"]
            seconds = time.perf_counter() - start
            steps.append({"method": stage.name, "kind": "model", "walk": None, "seconds": round(seconds, 2)})
            stage_records.append({"method": stage.name, "config": stage.method.config,
                                  "result": {k: v for k, v in out_record.items() if k != "model"}})
    after = _unique_parameters(model)
    fmt = _export_format(recipe.export.format, model)
    record = {"command": "run", "source": recipe.model, "recipe": recipe.raw, "format": fmt,
              "calibration": dataclasses.asdict(recipe.data) if tokens is not None else None,
              "stages": stage_records, "walks": walks, "parameters": {"before": before, "after": after},
              "layers": layers, "metrics": {"seconds": round(sum(s["seconds"] for s in steps), 1)}}
    folder = export_model(model, loaded.tokenizer, out, record, fmt, source, force, recipe.text)
    metrics = evaluate(recipe, model, streams, dev)
    if metrics:
        record["metrics"].update(metrics)
        _update_record(folder, metrics)
    return RunResult(folder, record, steps, record["metrics"], (before, after), walks)


def _export_format(fmt: str, model) -> str:
    from compress.methods.quantize.export import check_exportable, quantized_linears

    quantized = bool(quantized_linears(model))
    if fmt == "auto" and not quantized:
        return "safetensors"
    if fmt in ("compressed-tensors", "gptq") and not quantized:
        raise CompressError(f"export format {fmt} needs quantized weights, but no stage quantized the model; "
                            "use format safetensors (or auto)")
    if fmt == "safetensors" and quantized:
        raise CompressError("the model is quantized; export it as compressed-tensors or gptq, not safetensors")
    if quantized:
        fmt = "compressed-tensors" if fmt == "auto" else fmt
        for name, (_, params) in quantized_linears(model).items():  # shapes the format can hold
            check_exportable(model, [name], params.bits, params.group_size, fmt)
    return fmt


def _width_config(model):
    """The config describing the model's current layer widths (pruned layers), and the extra files a
    per-layer-width config needs beside it."""
    from compress.modeling_pruned import FILE_NAME, modeling_source, per_layer_config

    config = model.config
    try:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        layers = model.model.layers
        heads = [layer.self_attn.q_proj.out_features // head_dim for layer in layers]
        kv = [layer.self_attn.k_proj.out_features // head_dim for layer in layers]
        ffn = [layer.mlp.down_proj.in_features for layer in layers]
    except AttributeError:  # not a LLaMA-like layout: nothing a stage could have resized
        return config, {}
    unchanged = (set(heads) == {config.num_attention_heads} and set(kv) == {config.num_key_value_heads}
                 and set(ffn) == {config.intermediate_size} and config.model_type != "compress_llama")
    if unchanged:
        return config, {}
    new = per_layer_config(config, heads, kv, ffn)
    new._attn_implementation = config._attn_implementation
    extra = {FILE_NAME: modeling_source()} if getattr(new, "auto_map", None) else {}
    return new, extra


def export_model(model, tokenizer, out, record: dict, fmt: str, source, force: bool, recipe_text: str) -> Path:
    from compress.export import save_model
    from compress.methods.quantize.export import save_compressed_tensors, save_gptq

    config, extra = _width_config(model)
    extra = {**extra, RECIPE_FILE: recipe_text}
    original = model.config
    model.config = config
    try:
        if fmt == "compressed-tensors":
            return save_compressed_tensors(model, tokenizer, out, record, source, force, extra_files=extra)
        if fmt == "gptq":
            return save_gptq(model, tokenizer, out, record, source, force, extra_files=extra,
                             **_gptq_options(record))
        return save_model(model, tokenizer, out, record, source_path=source, force=force, extra_files=extra)
    finally:
        model.config = original


def _gptq_options(record: dict) -> dict:
    """act_order / sequential / damp / static_groups for quantize_config.json from the last stage whose
    config has them."""
    options = {}
    for stage in record["stages"]:
        cfg = stage["config"]
        for key in ("act_order", "sequential", "damp", "static_groups"):
            if hasattr(cfg, key):
                options[key] = getattr(cfg, key)
    return options


def prepare_eval(recipe: Recipe, tokenizer) -> dict[str, torch.Tensor]:
    """Tokenize the evaluation texts and check the windows and the fidelity reference, before any work."""
    if not recipe.perplexity and recipe.fidelity is None:
        return {}
    from compress.data import evaluation_stream
    from compress.models import resolve_model_path
    from evaluation.perplexity import window_starts

    if tokenizer is None:
        raise CompressError("the recipe's eval needs the model's tokenizer, and the model folder has none")
    streams: dict[str, torch.Tensor] = {}
    for section in [*recipe.perplexity, *([recipe.fidelity] if recipe.fidelity else [])]:
        if section.data not in streams:
            streams[section.data] = evaluation_stream(tokenizer, section.data)
        window_starts(streams[section.data].numel(), section.seqlen, getattr(section, "stride", None) or section.seqlen,
                      section.windows)
    if recipe.fidelity is not None:
        resolve_model_path(recipe.fidelity.reference or recipe.model)
    return streams


def evaluate(recipe: Recipe, model, streams: dict[str, torch.Tensor], device) -> dict:
    """The recipe's perplexity and fidelity measurements of the in-memory (exported) model."""
    if not recipe.perplexity and recipe.fidelity is None:
        return {}
    from compress.models import load_model
    from evaluation.perplexity import perplexity

    model.to(device)
    stream = streams.__getitem__
    metrics: dict[str, Any] = {}
    results = []
    for p in recipe.perplexity:
        r = perplexity(model, stream(p.data), p.seqlen, p.stride, p.windows, p.batch_size).as_dict()
        results.append({"data": p.data, **r})
    if results:
        metrics["perplexity"] = results
    if recipe.fidelity is not None:
        from evaluation.fidelity import fidelity

        f = recipe.fidelity
        ref = load_model(f.reference or recipe.model, device=str(device), tokenizer=False)
        r = fidelity(model, ref.model, stream(f.data), f.seqlen, f.windows, f.batch_size).as_dict()
        metrics["fidelity"] = {"reference": f.reference or recipe.model, "data": f.data, "seqlen": f.seqlen, **r}
        del ref
    return metrics


def _update_record(folder: Path, metrics: dict) -> None:
    from compress.export import RECORD_FILE

    path = folder / RECORD_FILE
    record = json.loads(path.read_text())
    record.setdefault("metrics", {}).update(metrics)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, path)
