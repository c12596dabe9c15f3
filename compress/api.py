"""The Python API: the CLI verbs' operations on in-memory models (see :mod:`compress`).

Every function runs the same pipeline steps as the CLI (:mod:`compress.pipeline`): a method from the
registry with its validated Config, its data-free checks before any calibration, the layer walk or
the whole-model run; :func:`save` picks the exporter from what was applied.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from compress.errors import CompressError
from compress.models import LoadedModel, load_model


def load(model: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str = "cpu") -> LoadedModel:
    """Load an alias, a Hugging Face folder, a GGUF file or a compress output folder."""
    return load_model(model, dtype=dtype, device=device)


def _loaded(model, tokenizer=None) -> LoadedModel:
    if isinstance(model, LoadedModel):
        if tokenizer is not None:
            model.tokenizer = tokenizer
        return model
    if isinstance(model, torch.nn.Module):  # remembered on the module, so save() knows what was applied
        loaded = model.__dict__.get("_compress_loaded")
        if loaded is None:
            loaded = LoadedModel(model=model, tokenizer=tokenizer, source=type(model).__name__, path=None)
            object.__setattr__(model, "_compress_loaded", loaded)
        if tokenizer is not None:
            loaded.tokenizer = tokenizer
        return loaded
    raise CompressError(f"model must be a LoadedModel (compress.load) or a torch.nn.Module, got {type(model).__name__}")


def compress(model, method: str, *, data: str = "generate", samples: int = 128, seqlen: int = 512, seed: int = 0,
             batch_size: int = 8, device: str = "auto", state_dir: str | os.PathLike | None = None,
             tokens: torch.Tensor | None = None, tokenizer=None, verb: str | None = None, **options) -> dict:
    """Apply the registered ``method`` (its Config fields as ``options``) to ``model`` in place.

    Layer methods run in one layer walk over ``samples`` × ``seqlen`` calibration tokens from ``data``
    (none are made for a data-free method), or over ``tokens`` (N, L) when given; whole-model methods
    get a RunContext. Returns the record (method, config, per-layer summary, walk records, parameters,
    decoder_removed_fraction, seconds).
    """
    from compress.data import check_sizes
    from compress.job import DataSection, Job, Stage
    from compress.pipeline import prepare, run_stages, unique_parameters
    from compress.plugin import build_method
    from compress.walk import resolve_device

    loaded = _loaded(model, tokenizer)
    built = build_method(method, options, verb=verb)
    job = Job(model=loaded.source, stages=[Stage(built, dict(options))], device=device, batch_size=batch_size,
              data=DataSection(data, samples, seqlen, seed), state_dir=None if state_dir is None else str(state_dir),
              command=verb or method)
    if tokens is not None:
        samples, seqlen = tuple(tokens.shape) if tokens.ndim == 2 else (0, 0)
        data = "tokens"
    if job.needs_calibration and tokens is None:
        check_sizes(samples, seqlen)
        if loaded.tokenizer is None:
            raise CompressError(f"{method} calibrates on text: the model needs a tokenizer (pass tokenizer=)")
    decoder = loaded.model.model.layers
    before, decoder_before = unique_parameters(loaded.model), unique_parameters(decoder)
    prepare(job, loaded.model, loaded.tokenizer)
    done = run_stages(job, loaded.model, loaded.tokenizer, resolve_device(device), source=loaded.source,
                      tokens=tokens)
    loaded.model = done.model
    decoder_after = unique_parameters(loaded.model.model.layers)
    record = {"method": built.name, "config": built.config, "layers": built.describe_layers(loaded.model) or [],
              **built.summary(),
              "records": done.layers, "seconds": round(done.seconds, 2),
              "parameters": {"before": before, "after": unique_parameters(loaded.model),
                             "decoder_before": decoder_before, "decoder_after": decoder_after},
              "decoder_removed_fraction": 1.0 - decoder_after / decoder_before,
              "calibration": {"data": data, "samples": samples, "seqlen": seqlen, "seed": seed}
              if job.needs_calibration else None}
    loaded.stages.append(job.stages[0])
    loaded.records.append(record)
    return record


def prune(model, method: str = "slimgpt", **kwargs) -> dict:
    """Structured pruning (``compress prune``): e.g. ``prune(m, ratio=0.2, data="wikitext2")``."""
    return compress(model, method, verb="prune", **kwargs)


def quantize(model, method: str = "gptq", **kwargs) -> dict:
    """Weight quantization (``compress quantize``): e.g. ``quantize(m, bits=4, group_size=64)``."""
    return compress(model, method, verb="quantize", **kwargs)


def save(model, out: str | os.PathLike, *, format: str = "auto", force: bool = False, tokenizer=None,
         record: dict | None = None) -> Path:
    """Write ``model`` to ``out`` with the exporter its applied stages need (or ``format``), atomically;
    compress.json holds what was applied."""
    from compress.exporters import choose_format, get_exporter

    loaded = _loaded(model, tokenizer)
    methods = [s.method for s in loaded.stages]
    fmt = choose_format(format, loaded.model, methods)
    exporter = get_exporter(fmt)
    full = {"command": "api", "source": loaded.source,
            "stages": [{"method": s.name, "config": s.method.config, "result": r}
                       for s, r in zip(loaded.stages, loaded.records)], **(record or {})}
    # the folder it was read from and what the user named (a GGUF file or alias: its file, the folder
    # holding it and its cached float folder are inputs too); a bare module has neither
    sources = [loaded.path, loaded.source] if loaded.path is not None else []
    sources += [p for s in loaded.stages for p in (s.method.input_paths() or [])]  # e.g. a transfer's sources
    return exporter.save(loaded.model, loaded.tokenizer, out, full, source=sources, force=force,
                         options=exporter.options(methods))
