"""``compress prune``: structured pruning of a LLaMA-family model (SlimGPT, FLAP, ShortGPT)."""

from __future__ import annotations

import click

from compress.cli.common import calibration_options, device_option, print_table
from compress.cli.options import MethodCommand, method_options
from compress.errors import CompressError


def _check_ratio(ratio: float) -> None:
    if not 0.0 < ratio < 1.0:
        raise CompressError(f"--ratio must be strictly between 0 and 1 (the fraction of decoder parameters to "
                            f"remove), got {ratio}")


@click.command("prune", cls=MethodCommand, verb="prune")
@click.argument("model")
@click.option("--method", "method_name", default="slimgpt", show_default=True,
              help="Pruning method (a registered name of the prune verb).")
@click.option("--ratio", type=float, default=None,
              help="Fraction of the decoder layers' parameters to remove, in (0, 1) (required unless the method "
                   "takes --layers).")
@click.option("--out", required=True, help="Output folder (must not exist unless --force).")
@click.option("--schedule", type=click.Choice(["log", "linear", "uniform", "global"]), default=None,
              help="SlimGPT's per-layer ratios: log = the paper's Incremental Pruning Ratio (default), global = "
                   "allocated by OBS error across layers.")
@click.option("--gqa-unit", type=click.Choice(["query", "kv"]), default=None,
              help="Under grouped-query attention: remove query heads evenly in every KV group (query, the "
                   "default), or whole KV groups (kv).")
@calibration_options(default_data="generate")
@click.option("--eval", "with_eval", is_flag=True, help="Measure WikiText-2 perplexity before and after.")
@click.option("--eval-seqlen", type=int, default=128, show_default=True, help="Window length for --eval.")
@click.option("--eval-windows", type=int, default=80, show_default=True,
              help="Score the first K windows with --eval (80 × 128 tokens: about half a minute per model on a "
                   "2-core CPU for smollm2-135m).")
@click.option("--resume", "state_dir", default=None,
              help="State folder: the walk saves its progress there after every layer and a rerun with the "
                   "same arguments continues where it stopped.")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@device_option
def prune_command(model, method_name, ratio, out, schedule, gqa_unit, data, samples, seqlen, seed, batch_size,
                  with_eval, eval_seqlen, eval_windows, state_dir, force, device, _method_options):
    """Remove attention heads and FFN channels from MODEL and save a smaller model to --out.

    MODEL is a Hugging Face folder, a GGUF file or the alias smollm2-135m. Every layer with the
    same widths gives a plain Llama checkpoint; different widths per layer (--schedule log/linear)
    give a per-layer config plus modeling_compress_llama.py (from_pretrained(..., trust_remote_code=True)
    or compress.load reload it). The flags after --gqa-unit's are the method's Config fields.
    """
    from compress.data import check_sizes
    from compress.job import DataSection, Job, PerplexitySection, Stage
    from compress.pipeline import preflight, run_job, update_record
    from compress.plugin import build_method

    given = {k: v for k, v in (("ratio", ratio), ("schedule", schedule), ("gqa_unit", gqa_unit)) if v is not None}
    options = method_options("prune", method_name, {**given, **_method_options})
    if ratio is not None:
        _check_ratio(ratio)
    elif "layers" not in options:
        raise CompressError("--ratio is required (or --layers N with a depth-pruning method such as shortgpt)")
    check_sizes(samples, seqlen)
    method = build_method(method_name, options, verb="prune")
    evals = [PerplexitySection(data="wikitext2", seqlen=eval_seqlen, windows=eval_windows)] if with_eval else []
    job = Job(model=model, stages=[Stage(method, options)], out=out, device=device, batch_size=batch_size,
              data=DataSection(data, samples, seqlen, seed), perplexity=evals, eval_before=with_eval,
              state_dir=state_dir, command="prune")
    source = preflight(job, out, force)
    result = run_job(job, out, force=force, source=source, record_hook=_prune_record(method, model, job))
    if with_eval:  # the keys `compress prune --eval` has always written, beside the pipeline's
        legacy = {"perplexity_before": result.metrics["before"]["perplexity"][0]["perplexity"],
                  "perplexity_after": result.metrics["perplexity"][0]["perplexity"],
                  "eval_seqlen": eval_seqlen, "eval_windows": eval_windows}
        result.metrics.update(legacy)
        update_record(result.folder, legacy)
    _report(result, eval_seqlen)


def _prune_record(method, model_spec, job):
    """compress.json of `compress prune`: the keys it has always had, beside the pipeline's."""
    def hook(record, done, model):
        params = record["parameters"]
        record.update(source=str(model_spec), method=method.name, config=method.config,
                      calibration={"data": job.data.source, "samples": job.data.samples, "seqlen": job.data.seqlen,
                                   "seed": job.data.seed},
                      records=[{k: v for k, v in r.items() if k != "walk"} for r in done.layers],
                      layers=method.describe_layers(model) or [], **method.summary())
        record["metrics"]["decoder_removed_fraction"] = 1.0 - params["decoder_after"] / params["decoder_before"]
    return hook


def _report(result, eval_seqlen) -> None:
    record = result.record
    layers = record["layers"]
    if layers:
        columns = list(layers[0])
        print_table([(i, *(layer.get(c) for c in columns)) for i, layer in enumerate(layers)], ("layer", *columns))
        click.echo("")
    params, metrics = record["parameters"], result.metrics
    totals = [("parameters before", params["before"]), ("parameters after", params["after"]),
              ("decoder parameters removed", f"{100 * metrics['decoder_removed_fraction']:.2f}%"),
              ("time (s)", metrics["seconds"])]
    if "perplexity_after" in metrics:
        totals += [(f"perplexity before (wikitext2 @ {eval_seqlen})", metrics["perplexity_before"]),
                   (f"perplexity after (wikitext2 @ {eval_seqlen})", metrics["perplexity_after"])]
    if record.get("dropped_layers") is not None:
        totals.append(("layers removed", ", ".join(map(str, record["dropped_layers"]))))
    totals.append(("saved to", str(result.folder)))
    print_table(totals, ("", "value"))


def register(group: click.Group) -> None:
    group.add_command(prune_command)
