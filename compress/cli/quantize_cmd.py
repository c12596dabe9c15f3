"""``compress quantize``: RTN or GPTQ weight quantization in one walk, written in a format that loads."""

from __future__ import annotations

import click

from compress.cli.common import calibration_options, device_option, print_table
from compress.cli.options import MethodCommand, method_options


@click.command("quantize", cls=MethodCommand, verb="quantize")
@click.argument("model")
@click.option("--method", default="gptq", show_default=True,
              help="gptq (Hessian error feedback, needs calibration data), rtn (round-to-nearest, data-free) "
                   "or another registered quantization method.")
@click.option("--bits", type=int, default=4, show_default=True, help="Weight bit width: 2, 3, 4 or 8.")
@click.option("--group-size", type=int, default=None,
              help="Input columns per scale/zero; -1 = per output channel. Must divide every input width. "
                   "[default: auto: 128 where it divides every width, else 64 or 32 (64 on smollm2-135m)]")
@click.option("--sym/--asym", default=True, show_default=True,
              help="Symmetric grid (pack-quantized) or asymmetric min/max grid (naive-quantized in compressed-tensors).")
@click.option("--act-order", is_flag=True,
              help="GPTQ: columns in order of decreasing Hessian diagonal (static groups).")
@click.option("--format", "fmt", type=click.Choice(["compressed-tensors", "gptq"]), default="compressed-tensors",
              show_default=True, help="Checkpoint layout: compressed-tensors (transformers, vLLM) or GPTQ v1.")
@click.option("--out", required=True, help="Output folder (must not exist unless --force).")
@calibration_options(default_data="generate")
@click.option("--ignore", multiple=True, default=("lm_head",), show_default=True,
              help="Module name pattern left in float (repeatable; fnmatch or re:REGEX).")
@click.option("--block-size", type=int, default=None, help="GPTQ lazy-update block size. [default: 128]")
@click.option("--damp", type=float, default=None, help="GPTQ dampening (fraction of mean diag H). [default: 0.01]")
@click.option("--no-sequential", is_flag=True,
              help="GPTQ: observe all modules of a layer at once (faster).")
@click.option("--no-clip-search", is_flag=True, help="Plain min/max grid instead of the MSE clipping search.")
@click.option("--resume", "state_dir", default=None,
              help="State folder: the walk saves its progress there after every layer and a rerun with the "
                   "same arguments continues where it stopped.")
@click.option("--force", is_flag=True, help="Replace an existing output folder.")
@device_option
def quantize_command(model, method, bits, group_size, sym, act_order, fmt, out, data, samples, seqlen, seed, ignore,
                     block_size, damp, no_sequential, no_clip_search, batch_size, state_dir, force, device,
                     _method_options):
    """Quantize MODEL's decoder-layer weights to BITS-bit integers with GPTQ or RTN and save it to --out.

    MODEL is a Hugging Face folder, a GGUF file or the alias smollm2-135m. The flags after --device
    are the methods' other Config fields.
    """
    from compress.data import check_sizes
    from compress.errors import CompressError
    from compress.job import DataSection, ExportSection, Job, Stage
    from compress.methods.quantize.export import check_not_quantized
    from compress.pipeline import preflight, run_job
    from compress.plugin import build_method

    options = {"bits": bits, "group_size": group_size, "sym": sym, "ignore": list(ignore),
               "clip_search": not no_clip_search}
    given = {"act_order": True if act_order else None, "block_size": block_size, "damp": damp,
             "sequential": False if no_sequential else None}  # flags not given keep the method's defaults
    options.update(method_options("quantize", method,
                                  {**_method_options, **{k: v for k, v in given.items() if v is not None}}))
    quant = build_method(method, options, verb="quantize")  # validates bits, group size, ... before any loading
    if batch_size <= 0:
        raise CompressError(f"--batch-size must be positive, got {batch_size}")
    if quant.needs_data:
        check_sizes(samples, seqlen)
    job = Job(model=model, stages=[Stage(quant, options)], out=out, device=device, batch_size=batch_size,
              data=DataSection(data, samples, seqlen, seed), export=ExportSection(fmt), state_dir=state_dir,
              command="quantize")
    source = preflight(job, out, force)
    check_not_quantized(source)
    result = run_job(job, out, force=force, source=source, record_hook=_quantize_record(quant, model, job))
    _closing_table(result, quant)


def _quantize_record(quant, model_spec, job):
    """compress.json of `compress quantize`: the keys it has always had, beside the pipeline's."""
    def hook(record, done, model):
        tokens = done.tokens
        record.update(source=str(model_spec), method=quant.name, config=quant.config,
                      calibration={"data": job.data.source if quant.needs_data else None,
                                   "samples": int(tokens.shape[0]), "seqlen": int(tokens.shape[1]),
                                   "seed": job.data.seed},
                      seconds=done.seconds, layers=[{k: v for k, v in r.items() if k != "walk"} for r in done.layers])
    return hook


def _closing_table(result, quant):
    from compress.metrics.cost import bytes_on_disk

    record = result.record
    rows = []
    key = None
    for layer, secs in zip(record["layers"], result.layer_seconds):
        errors = [v for v in layer.get(record["method"], {}).values() if isinstance(v, dict)]
        key = key or ("output_err" if any("output_err" in e for e in errors) else "weight_err")
        values = [e[key] for e in errors if key in e]
        if values:
            rows.append((layer["layer"], len(values), sum(values) / len(values), max(values), round(secs, 2)))
    print_table(rows, ("layer", "modules", f"mean {key}", f"max {key}", "seconds"))
    before, after = bytes_on_disk(result.source), bytes_on_disk(result.folder)
    click.echo("")
    group = getattr(quant, "group_size_note", None) or record["config"].group_size
    print_table([("group size", group), ("size on disk before (MB)", before / 1e6), ("size on disk after (MB)", after / 1e6),
                 ("ratio", after / max(before, 1)), ("walk seconds", record["seconds"]),
                 ("saved to", str(result.folder))], ("summary", "value"))


def register(group: click.Group) -> None:
    group.add_command(quantize_command)
