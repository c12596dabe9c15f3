"""Metrics: perplexity, fidelity against a reference, and cost; :func:`evaluate` runs them together.

* :mod:`compress.metrics.perplexity` — the perplexity protocol (windows, strides, the loss mean).
* :mod:`compress.metrics.fidelity` — mean KL(reference ‖ model) and top-1 agreement.
* :mod:`compress.metrics.cost` — parameters, bytes on disk, KV-cache bytes per token, tokens/s.

:func:`evaluate` is ``compress eval`` as a function (``compress.evaluate``): it returns the object
that ``compress eval MODEL --json`` prints, with the same keys and the same numbers.
"""

from __future__ import annotations

import numbers
import os
import time

import torch

from compress.errors import CompressError
from compress.metrics.cost import measure_cost as _measure_cost
from compress.metrics.fidelity import fidelity as _fidelity
from compress.metrics.fidelity import perplexity_and_fidelity as _perplexity_and_fidelity
from compress.metrics.perplexity import perplexity as _perplexity
from compress.metrics.perplexity import window_starts as _window_starts

__all__ = ["evaluate"]


def evaluate(model, data: str | os.PathLike = "wikitext2", seqlen: int = 2048, windows: int | None = None,
             stride: int | None = None, batch_size: int = 1, reference=None, cost: bool = False,
             device: str | torch.device = "auto", tokenizer=None) -> dict:
    """Perplexity of ``model`` on ``data`` (and optionally fidelity and cost), as ``compress eval --json``.

    ``model``: a :class:`compress.models.LoadedModel` (``compress.load(...)``), a bare
    ``torch.nn.Module`` (then ``tokenizer=`` is required) or a model spec (alias, Hugging Face
    folder, GGUF file; loaded as ``compress eval`` loads it). ``data``: ``wikitext2``, a text file, a
    folder of ``.txt`` files or JSON lines. ``seqlen``/``windows``/``stride``/``batch_size``: the
    perplexity protocol of :mod:`compress.metrics.perplexity`. ``reference``: a model spec, a
    LoadedModel or a module; adds ``kl_divergence``, ``top1_agreement`` and ``positions``. ``cost``:
    adds ``parameters``, ``bytes_on_disk`` (only when the model has a folder: a LoadedModel or a
    spec), ``kv_cache_bytes_per_token``, ``prefill_tokens_per_s`` and ``decode_tokens_per_s``.
    ``device``: ``auto`` loads a spec on CUDA when present (else CPU) and leaves an in-memory model
    where it is; ``cpu``/``cuda`` load a spec there or move an in-memory model there (in place).
    ``tokenizer``: overrides the LoadedModel's tokenizer.

    Returns ``perplexity``, ``seqlen``, ``stride``, ``windows``, ``tokens``, ``seconds`` (wall time of
    the whole call: loading, scoring, fidelity and cost), ``model``
    (the spec, a LoadedModel's ``source``, or a module's ``config._name_or_path`` / class name) and
    ``data`` (``str(data)``), plus the keys above. Bad values, missing files, a text too short for
    the windows asked for and a missing tokenizer raise :class:`compress.errors.CompressError`, all
    before the model is run.
    """
    started = time.perf_counter()
    from compress.data import evaluation_stream
    from compress.models import LoadedModel, load_model
    from compress.walk import resolve_device

    asked = resolve_device(device) if str(device) != "auto" or isinstance(model, (str, os.PathLike)) else None
    seqlen, windows, stride, batch_size = _check_protocol(seqlen, windows, stride, batch_size)
    if reference is not None and not isinstance(reference, (str, os.PathLike, LoadedModel, torch.nn.Module)):
        raise CompressError(f"reference must be a model path, a LoadedModel or a torch.nn.Module, "
                            f"got {type(reference).__name__}")
    if isinstance(model, (str, os.PathLike)):
        loaded = load_model(model, device=str(asked))
        module, tok, folder, name = loaded.model, loaded.tokenizer, loaded.path, str(model)
    elif isinstance(model, LoadedModel):
        module, tok, folder, name = model.model, model.tokenizer, model.path, str(model.source)
    elif isinstance(model, torch.nn.Module):
        module, tok, folder, name = model, None, None, _module_name(model)
    else:
        raise CompressError(f"model must be a LoadedModel (compress.load), a torch.nn.Module or a model path, "
                            f"got {type(model).__name__}")
    tok = tokenizer if tokenizer is not None else tok
    if tok is None:
        raise CompressError("the model has no tokenizer to read the evaluation text: pass tokenizer= "
                            "(e.g. the AutoTokenizer of the model's folder)")
    if asked is not None and not _same_device(_device_of(module), asked):
        module.to(asked)
    dev = _device_of(module)

    stream = evaluation_stream(tok, data)
    _window_starts(stream.numel(), seqlen, stride or seqlen, windows)  # validate before the long work
    ref = _reference_module(reference, dev, load_model, LoadedModel)
    if ref is not None and stride in (None, seqlen):  # one pass of both models over each window
        ppl, fid = _perplexity_and_fidelity(module, ref, stream, seqlen, windows, batch_size)
        result = {**ppl.as_dict(), "model": name, "data": str(data), **fid.as_dict()}
    else:
        result = _perplexity(module, stream, seqlen, stride, windows, batch_size).as_dict()
        result.update(model=name, data=str(data))
        if ref is not None:
            result.update(_fidelity(module, ref, stream, seqlen, windows, batch_size).as_dict())
    del ref
    if cost:
        measured = _measure_cost(module, folder).as_dict()
        if folder is None:
            del measured["bytes_on_disk"]  # a bare module has no files
        result.update(measured)
    result["seconds"] = time.perf_counter() - started  # the whole evaluation: loading, scoring, cost
    return result


def _check_protocol(seqlen, windows, stride, batch_size) -> tuple:
    """The scalar arguments, before anything is loaded (same messages as ``compress eval``)."""
    for label, value, optional in (("seqlen", seqlen, False), ("windows", windows, True),
                                   ("stride", stride, True), ("batch-size", batch_size, False)):
        if value is None and optional:
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise CompressError(f"--{label} must be an integer, got {value!r}")
    if seqlen <= 0:
        raise CompressError(f"--seqlen must be a positive number of tokens, got {seqlen}")
    if stride is not None and (stride <= 0 or stride > seqlen):
        raise CompressError(f"--stride must be in 1..seqlen ({seqlen}), got {stride}")
    if windows is not None and windows <= 0:
        raise CompressError(f"--windows must be positive, got {windows}")
    if batch_size <= 0:
        raise CompressError(f"--batch-size must be positive, got {batch_size}")
    return int(seqlen), None if windows is None else int(windows), None if stride is None else int(stride), \
        int(batch_size)


def _reference_module(reference, device: torch.device, load_model, loaded_class):
    if reference is None:
        return None
    if isinstance(reference, (str, os.PathLike)):
        return load_model(reference, device=str(device), tokenizer=False).model
    return reference.model if isinstance(reference, loaded_class) else reference


def _device_of(module: torch.nn.Module) -> torch.device:
    try:
        return next(module.parameters()).device
    except StopIteration:
        raise CompressError("the model has no parameters") from None


def _same_device(current: torch.device, asked: torch.device) -> bool:
    return current.type == asked.type and (asked.index is None or current.index == asked.index)


def _module_name(module: torch.nn.Module) -> str:
    config = getattr(module, "config", None)
    return str(getattr(config, "_name_or_path", "") or type(module).__name__)
