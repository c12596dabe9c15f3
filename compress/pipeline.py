"""One pipeline behind ``compress run``, every CLI verb and the Python API::

    preflight ──► load ──► prepare (plans, export checks, eval data) ──► stages ──► export ──► evaluate

* **preflight** (no loading): the model resolves, ``out`` is free and is not, does not hold and does
  not lie inside any input (the model in all its forms and what each method declares it reads,
  ``Method.input_paths``); the output's lock is taken, so a second run to the same ``out`` fails here.
* **prepare**: each layer method plans on the loaded model (``prepare``), the exporter checks what it
  will have to hold (``check_plan``), the evaluation texts and windows are checked — all before any
  calibration, so bad settings fail in seconds.
* **stages**: a run of consecutive layer-wise stages is one walk (:func:`compress.walk.walk`);
  whole-model stages get a :class:`compress.plugin.RunContext`. Calibration tokens are made once,
  and only when a stage observes its inputs.
* **export**: the exporter registry (:mod:`compress.exporters`) picks the format from what the
  stages produced; **evaluate** writes its metrics into compress.json.

Nothing here knows a method by name.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from compress.errors import CompressError
from compress.job import DTYPES, Job, Stage
from compress.plugin import LayerMethod, RunContext

RECIPE_FILE = "recipe.yaml"


@dataclass
class StagesResult:
    """What running the stages did, for the record and the closing tables."""

    steps: list[dict] = field(default_factory=list)  # per stage: method, kind, walk, seconds
    layers: list[dict] = field(default_factory=list)  # walk records, each with its walk's number
    stage_records: list[dict] = field(default_factory=list)
    walks: int = 0
    tokens: torch.Tensor | None = None
    layer_seconds: list[float] = field(default_factory=list)
    seconds: float = 0.0
    model: torch.nn.Module | None = None  # the model after the stages (a whole-model stage may build a new one)


@dataclass
class RunResult:
    folder: Path
    record: dict
    steps: list[dict]
    metrics: dict
    parameters: tuple[int, int]
    walks: int = 0
    layer_seconds: list[float] = field(default_factory=list)
    source: Path | None = None
    model: torch.nn.Module | None = None


def unique_parameters(model: torch.nn.Module) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel()
    return total


def job_inputs(job: Job) -> list:
    """Every input the job reads: the model and the paths its methods declare (``Method.input_paths``)."""
    inputs: list = [job.model]
    for stage in job.stages:
        declared = getattr(stage.method, "input_paths", None)
        inputs.extend(p for p in ((declared() if declared else None) or []) if p)
    return inputs


def preflight(job: Job, out: str | None, force: bool) -> Path:
    """The checks that need the machine but no loading: the model resolves, the output is free and is
    none of the inputs (in any of their forms: :func:`compress.export.input_paths`). The output's lock
    is taken for this thread (released by :func:`run_job`, or when the CLI command ends): a second run
    to the same ``out`` fails here without ``force`` (with it, it waits at the write)."""
    from compress.export import OutputBusy, check_output_path
    from compress.models import resolve_model_path

    if not out:
        raise CompressError("no output folder: pass --out (or 'out:' in a recipe)")
    inputs = job_inputs(job)
    check_output_path(out, inputs, force)  # before any input is resolved (a GGUF is converted then)
    for stage in job.stages:
        _check_requires(stage)
    source = resolve_model_path(job.model)
    try:
        check_output_path(out, [source, *inputs], force, claim=True, wait=False)
    except OutputBusy:
        if not force:
            raise
    return source


def _check_requires(stage: Stage, extras: dict | None = None) -> None:
    missing = [k for k in getattr(stage.method, "requires", ()) if k not in (extras or {})]
    if missing:
        raise CompressError(f"method {stage.name} needs {', '.join(missing)}, which a recipe does not provide; "
                            "use its own command")


def prepare(job: Job, model: torch.nn.Module, tokenizer) -> tuple[str, dict]:
    """Plan every layer method, choose and check the export format, read and check the eval texts.
    Returns (format, eval streams)."""
    return plan(job, model), eval_streams(job, tokenizer)


def plan(job: Job, model: torch.nn.Module) -> str:
    """The checks on the model that need neither data nor weights (shapes only: ``model`` may be a
    skeleton on the meta device, as for ``compress run --dry-run``): the layout, every layer method's
    ``prepare``, the export format and the exporter's ``check_plan``. Returns the format."""
    from compress.exporters import choose_format, get_exporter
    from compress.models import check_llama_like

    if any(s.layerwise for s in job.stages):
        check_llama_like(model)
    for stage in job.stages:
        if stage.layerwise:
            stage.method.prepare(model)  # plans every layer and fails before the walk where it can
    fmt = choose_format(job.export.format, model, job.methods)
    exporter = get_exporter(fmt)
    exporter.check_plan(model, job.methods, exporter.options(job.methods))
    return fmt


def calibration(job: Job, model, tokenizer) -> torch.Tensor:
    """The job's calibration tokens (N, L); a few dummy tokens when no stage observes its inputs."""
    from compress.data import calibration_tokens

    if not job.needs_calibration:
        return torch.zeros(1, 8, dtype=torch.long)  # data-free: the walk only moves from layer to layer
    d = job.data
    return calibration_tokens(model, tokenizer, d.source, d.samples, d.seqlen, d.seed)


def run_stages(job: Job, model: torch.nn.Module, tokenizer, device: torch.device, *,
               source: str | None = None, out: Path | None = None, tokens: torch.Tensor | None = None) -> StagesResult:
    """Run the job's stages on ``model`` in memory: one walk per run of layer-wise stages, over
    ``tokens`` when given, else the job's calibration (made once, when first needed)."""
    from compress import walk as walk_module

    result = StagesResult(tokens=tokens)
    start_all = time.perf_counter()
    for step in job.steps():
        start = time.perf_counter()
        if step[0].layerwise:
            methods: list[LayerMethod] = [s.method for s in step]
            if result.tokens is None:
                result.tokens = calibration(job, model, tokenizer)
            last = [time.perf_counter()]

            def timed(index, layer, last=last):
                now = time.perf_counter()
                result.layer_seconds.append(now - last[0])
                last[0] = now

            state = None if job.state_dir is None else Path(job.state_dir) / f"walk-{result.walks + 1}"
            prepass = [p for p in (m.prepass() for m in methods) if p is not None]
            if prepass:  # read-only walk over the unchanged model (a global plan across layers)
                walk_module.walk(model, result.tokens, prepass, device=device, batch_size=job.batch_size)
            walked = walk_module.walk(model, result.tokens, methods, device=device, batch_size=job.batch_size,
                                      state_dir=state, on_layer_done=timed)
            result.walks += 1
            result.layers.extend({"walk": result.walks, **r} for r in walked.records)
            seconds = time.perf_counter() - start
            for s in step:
                result.steps.append({"method": s.name, "kind": "layer", "walk": result.walks,
                                     "seconds": round(seconds, 2)})
                summary = s.method.summary()
                result.stage_records.append({"method": s.name, "config": s.method.config, "walk": result.walks,
                                             **({"result": summary} if summary else {})})
        else:
            stage = step[0]
            ctx = RunContext(model=model, tokenizer=tokenizer, device=device, source=source,
                             calibration=result.tokens, seed=job.data.seed, out=out)
            out_record = stage.method.run(ctx) or {}
            if isinstance(out_record.get("model"), torch.nn.Module):
                model = out_record["model"]
            seconds = time.perf_counter() - start
            result.steps.append({"method": stage.name, "kind": "model", "walk": None, "seconds": round(seconds, 2)})
            result.stage_records.append({"method": stage.name, "config": stage.method.config,
                                         "result": {k: v for k, v in out_record.items() if k != "model"}})
    result.seconds = time.perf_counter() - start_all
    result.model = model
    return result


def run_job(job: Job, out: str, *, force: bool = False, device: str | None = None, source: Path | None = None,
            record_hook=None) -> RunResult:
    """Do the whole job. ``record_hook(record, stages_result, model)`` may add a verb's own keys to
    compress.json before it is written. The output's lock (taken by :func:`preflight`) is released at
    the end, whatever happens."""
    from compress.export import release_output

    try:
        return _run_job(job, out, force=force, device=device, source=source or preflight(job, out, force),
                        record_hook=record_hook)
    finally:
        if out:
            release_output(out)


def _run_job(job: Job, out: str, *, force: bool, device: str | None, source: Path, record_hook) -> RunResult:
    from compress.models import decoder_layers, load_model
    from compress.walk import resolve_device

    dev = resolve_device(device or job.device)
    loaded = load_model(source, dtype=DTYPES[job.dtype])
    model = loaded.model
    fmt, streams = prepare(job, model, loaded.tokenizer)
    before_metrics = evaluate(job, model, streams, dev) if job.eval_before else {}
    before, decoder_before = unique_parameters(model), unique_parameters(decoder_layers(model))
    done = run_stages(job, model, loaded.tokenizer, dev, source=str(source), out=Path(out))
    model = done.model
    after = unique_parameters(model)
    parameters = {"before": before, "after": after, "decoder_before": decoder_before,
                  "decoder_after": unique_parameters(decoder_layers(model))}
    record = {"command": job.command, "source": job.model, "format": fmt,
              "calibration": dataclasses.asdict(job.data) if job.needs_calibration else None,
              "stages": done.stage_records, "walks": done.walks, "parameters": parameters,
              "layers": done.layers, "metrics": {"seconds": round(done.seconds, 1)}}
    if job.recipe is not None:
        record["recipe"] = job.recipe
    if record_hook is not None:
        record_hook(record, done, model)
    folder = export(model, loaded.tokenizer, out, record, fmt, job, [source, *job_inputs(job)], force)
    metrics = evaluate(job, model, streams, dev)
    if before_metrics:
        metrics["before"] = before_metrics
    if metrics:
        record["metrics"].update(metrics)
        update_record(folder, metrics)
    return RunResult(folder, record, done.steps, record["metrics"], (before, after), done.walks,
                     done.layer_seconds, Path(source), model)


def export(model, tokenizer, out, record: dict, fmt: str, job: Job, sources: list, force: bool) -> Path:
    """Write the model with the exporter ``fmt``, its options taken from the stages' configs."""
    from compress.exporters import get_exporter

    exporter = get_exporter(fmt)
    extra = {RECIPE_FILE: job.recipe_text} if job.recipe_text is not None else {}
    return exporter.save(model, tokenizer, out, record, source=sources, force=force, extra_files=extra,
                         options=exporter.options(job.methods))


def eval_streams(job: Job, tokenizer) -> dict[str, torch.Tensor]:
    """Tokenize the evaluation texts and check the windows and the fidelity reference, before any work."""
    if not job.perplexity and job.fidelity is None:
        return {}
    from compress.data import evaluation_stream
    from compress.metrics.perplexity import window_starts
    from compress.models import resolve_model_path

    if tokenizer is None:
        raise CompressError("the job's evaluation needs the model's tokenizer, and the model folder has none")
    streams: dict[str, torch.Tensor] = {}
    for section in [*job.perplexity, *([job.fidelity] if job.fidelity else [])]:
        if section.data not in streams:
            streams[section.data] = evaluation_stream(tokenizer, section.data)
        window_starts(streams[section.data].numel(), section.seqlen,
                      getattr(section, "stride", None) or section.seqlen, section.windows)
    if job.fidelity is not None:
        resolve_model_path(job.fidelity.reference or job.model)
    return streams


def evaluate(job: Job, model, streams: dict[str, torch.Tensor], device) -> dict:
    """The job's perplexity and fidelity measurements of the in-memory model."""
    if not job.perplexity and job.fidelity is None:
        return {}
    from compress.metrics.perplexity import perplexity
    from compress.models import load_model

    model.to(device)
    metrics: dict[str, Any] = {}
    results = [{"data": p.data, **perplexity(model, streams[p.data], p.seqlen, p.stride, p.windows,
                                             p.batch_size).as_dict()} for p in job.perplexity]
    if results:
        metrics["perplexity"] = results
    if job.fidelity is not None:
        from compress.metrics.fidelity import fidelity

        f = job.fidelity
        ref = load_model(f.reference or job.model, device=str(device), tokenizer=False)
        r = fidelity(model, ref.model, streams[f.data], f.seqlen, f.windows, f.batch_size).as_dict()
        metrics["fidelity"] = {"reference": f.reference or job.model, "data": f.data, "seqlen": f.seqlen, **r}
        del ref
    return metrics


def update_record(folder: Path, metrics: dict) -> None:
    from compress.export import RECORD_FILE

    path = folder / RECORD_FILE
    record = json.loads(path.read_text())
    record.setdefault("metrics", {}).update(metrics)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2, default=str) + "\n")
    os.replace(tmp, path)
