"""``compress prune``: structured pruning of a LLaMA-family model (SlimGPT)."""

from __future__ import annotations

import time

import click

from compress.cli.common import device_option, print_table
from compress.errors import CompressError


def _check_ratio(ratio: float) -> None:
    if not 0.0 < ratio < 1.0:
        raise CompressError(f"--ratio must be strictly between 0 and 1 (the fraction of decoder parameters to "
                            f"remove), got {ratio}")


@click.command("prune")
@click.argument("model")
@click.option("--method", "method_name", default="slimgpt", show_default=True, help="Pruning method (registered name).")
@click.option("--ratio", type=float, required=True, help="Fraction of the decoder layers' parameters to remove, in (0, 1).")
@click.option("--out", required=True, help="Output folder (must not exist unless --force).")
@click.option("--schedule", type=click.Choice(["log", "linear", "uniform"]), default="log", show_default=True,
              help="Per-layer ratios: log = SlimGPT's Incremental Pruning Ratio.")
@click.option("--gqa-unit", type=click.Choice(["query", "kv"]), default="query", show_default=True,
              help="Under grouped-query attention: remove query heads evenly in every KV group, or whole KV groups.")
@click.option("--data", default="generate", show_default=True,
              help="Calibration: 'generate' (text the model writes itself, data-free), wikitext2, c4, "
                   "or a text/JSON-lines file or folder.")
@click.option("--samples", type=int, default=128, show_default=True, help="Calibration samples.")
@click.option("--seqlen", type=int, default=512, show_default=True, help="Tokens per calibration sample.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the calibration windows.")
@click.option("--batch-size", type=int, default=8, show_default=True, help="Calibration samples per forward.")
@click.option("--eval", "with_eval", is_flag=True, help="Measure WikiText-2 perplexity before and after.")
@click.option("--eval-seqlen", type=int, default=128, show_default=True, help="Window length for --eval.")
@click.option("--eval-windows", type=int, default=None, help="Score only the first K windows with --eval.")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@device_option
def prune_command(model, method_name, ratio, out, schedule, gqa_unit, data, samples, seqlen, seed, batch_size,
                  with_eval, eval_seqlen, eval_windows, force, device):
    """Remove attention heads and FFN channels from MODEL and save a smaller model to --out.

    MODEL is a Hugging Face folder, a GGUF file or the alias smollm2-135m. Every layer with the
    same widths gives a plain Llama checkpoint; different widths per layer (--schedule log/linear)
    give a per-layer config plus modeling_compress_llama.py (from_pretrained(..., trust_remote_code=True)
    or compress.models.load_model reload it).
    """
    from compress.data import calibration_tokens, check_sizes
    from compress.export import check_output_path
    from compress.methods import get_method
    from compress.models import check_llama_like, load_model, resolve_model_path
    from compress.walk import resolve_device

    _check_ratio(ratio)
    check_sizes(samples, seqlen)
    if method_name != "slimgpt":
        get_method(method_name)  # unknown names get the registry's error
        raise CompressError(f"method '{method_name}' is not a structured pruning method (available: slimgpt)")
    dev = resolve_device(device)
    source = resolve_model_path(model)
    check_output_path(out, [source], force)
    from compress.methods.slimgpt.api import prepare, prune, save_pruned

    loaded = load_model(model)
    check_llama_like(loaded.model)
    options = {"ratio": ratio, "schedule": schedule, "gqa_unit": gqa_unit}
    method = prepare(loaded.model, options)  # plans every layer; a layer that would be emptied fails here
    dense_ppl = _perplexity(loaded, eval_seqlen, eval_windows) if with_eval else None
    tokens = calibration_tokens(loaded.model, loaded.tokenizer, data, samples, seqlen, seed)
    start = time.perf_counter()
    summary, records = prune(loaded.model, tokens, method, device=dev, batch_size=batch_size)
    seconds = time.perf_counter() - start
    pruned_ppl = _perplexity(loaded, eval_seqlen, eval_windows) if with_eval else None
    metrics = {"seconds": round(seconds, 1), "decoder_removed_fraction": summary.decoder_removed_fraction}
    if with_eval:
        metrics.update(perplexity_before=dense_ppl, perplexity_after=pruned_ppl, eval_seqlen=eval_seqlen,
                       eval_windows=eval_windows)
    record = {"source": str(model), "method": "slimgpt", "config": method.config,
              "calibration": {"data": data, "samples": samples, "seqlen": seqlen, "seed": seed},
              "parameters": {"before": summary.parameters_before, "after": summary.parameters_after},
              "layers": summary.layers, "records": records, "metrics": metrics}
    folder = save_pruned(loaded.model, loaded.tokenizer, out, record, source_path=source, force=force)
    _report(summary, seconds, dense_ppl, pruned_ppl, eval_seqlen, folder)


def _perplexity(loaded, seqlen: int, windows: int | None) -> float:
    from compress.data import evaluation_stream
    from evaluation.perplexity import perplexity

    stream = evaluation_stream(loaded.tokenizer, "wikitext2")
    return perplexity(loaded.model, stream, seqlen, None, windows).perplexity


def _report(summary, seconds, dense_ppl, pruned_ppl, eval_seqlen, folder) -> None:
    rows = [(i, layer["ratio"], layer["heads"], layer["kv_heads"], layer["ffn"]) for i, layer in enumerate(summary.layers)]
    print_table(rows, ("layer", "ratio", "heads", "kv_heads", "ffn"))
    click.echo("")
    totals = [("parameters before", summary.parameters_before), ("parameters after", summary.parameters_after),
              ("decoder parameters removed", f"{100 * summary.decoder_removed_fraction:.2f}%"),
              ("time (s)", round(seconds, 1))]
    if dense_ppl is not None:
        totals += [(f"perplexity before (wikitext2 @ {eval_seqlen})", dense_ppl),
                   (f"perplexity after (wikitext2 @ {eval_seqlen})", pruned_ppl)]
    totals.append(("saved to", str(folder)))
    print_table(totals, ("", "value"))


def register(group: click.Group) -> None:
    group.add_command(prune_command)
