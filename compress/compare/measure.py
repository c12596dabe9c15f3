"""Measuring every output on one protocol (``compress compare --eval``)."""

from __future__ import annotations

from compress.compare.records import Fidelity, Output, Perplexity, Protocol
from compress.errors import CompressError


def check_measure_options(data: str, seqlen: int, windows: int | None, reference: str | None) -> None:
    """The arguments of :func:`measure`, checked before any model is loaded."""
    from compress.data import resolve_data

    for label, value, optional in (("seqlen", seqlen, False), ("windows", windows, True)):
        if value is None and optional:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise CompressError(f"--{label} must be a positive integer, got {value!r}")
    resolve_data(str(data), split="test")
    if reference is not None:
        from compress.models import resolve_model_path

        resolve_model_path(reference)


def measure(outputs: list[Output], data: str = "wikitext2", seqlen: int = 2048, windows: int | None = None,
            reference: str | None = None, device: str = "auto", batch_size: int = 1) -> None:
    """Measure every output on one protocol: perplexity, and with ``reference`` KL and top-1 agreement
    (:func:`compress.evaluate`), and the parameter count of the loaded model where the record has none.
    Replaces the recorded metrics of each output (``measured`` becomes True). One model is held at a time, besides the reference."""
    import gc

    from compress.metrics import evaluate
    from compress.metrics.cost import count_parameters
    from compress.models import load_model
    from compress.progress import progress
    from compress.walk import resolve_device

    check_measure_options(data, seqlen, windows, reference)
    dev = resolve_device(device)
    ref = None if reference is None else load_model(reference, device=str(dev), tokenizer=False)
    for output in progress(outputs, desc="compare --eval", unit="model"):
        loaded = load_model(output.folder, device=str(dev))
        result = evaluate(loaded, data=data, seqlen=seqlen, windows=windows, reference=ref, device=dev,
                          batch_size=batch_size)
        ppl = Protocol("perplexity", str(data), seqlen, windows=result["windows"], stride=result["stride"])
        output.perplexities = [Perplexity(ppl, float(result["perplexity"]))]
        output.fidelities = []
        if ref is not None:
            fid = Protocol("fidelity", str(data), seqlen, reference=str(reference), positions=result["positions"])
            output.fidelities = [Fidelity(fid, float(result["kl_divergence"]), float(result["top1_agreement"]))]
        if output.parameters is None:  # the record's count is the pipeline's; else count the loaded model
            output.parameters = count_parameters(loaded.model)
        output.measured = True
        del loaded
        gc.collect()
