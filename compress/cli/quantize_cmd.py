"""``compress quantize``: RTN or GPTQ weight quantization in one walk, written in a format that loads."""

from __future__ import annotations

import time

import click

from compress.cli.common import device_option, print_table


@click.command("quantize")
@click.argument("model")
@click.option("--method", type=click.Choice(["gptq", "rtn"]), default="gptq", show_default=True,
              help="GPTQ (Hessian error feedback, needs calibration data) or round-to-nearest (data-free).")
@click.option("--bits", type=int, default=4, show_default=True, help="Weight bit width: 2, 3, 4 or 8.")
@click.option("--group-size", type=int, default=128, show_default=True,
              help="Input columns per scale/zero; -1 = per output channel. Must divide every input width.")
@click.option("--sym/--asym", default=True, show_default=True,
              help="Symmetric grid (pack-quantized) or asymmetric min/max grid (naive-quantized in compressed-tensors).")
@click.option("--act-order", is_flag=True, help="GPTQ: columns in order of decreasing Hessian diagonal (static groups).")
@click.option("--format", "fmt", type=click.Choice(["compressed-tensors", "gptq"]), default="compressed-tensors",
              show_default=True, help="Checkpoint layout: compressed-tensors (transformers, vLLM) or GPTQ v1.")
@click.option("--out", required=True, help="Output folder (must not exist unless --force).")
@click.option("--data", default="generate", show_default=True,
              help="Calibration text for GPTQ: generate (data-free), wikitext2, c4 or a local file.")
@click.option("--samples", type=int, default=128, show_default=True, help="Calibration sequences.")
@click.option("--seqlen", type=int, default=512, show_default=True, help="Tokens per calibration sequence.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the calibration sample.")
@click.option("--ignore", multiple=True, default=("lm_head",), show_default=True,
              help="Module name pattern left in float (repeatable; fnmatch or re:REGEX).")
@click.option("--block-size", type=int, default=128, show_default=True, help="GPTQ lazy-update block size.")
@click.option("--damp", type=float, default=0.01, show_default=True, help="GPTQ dampening (fraction of mean diag H).")
@click.option("--no-sequential", is_flag=True, help="GPTQ: observe all modules of a layer at once (faster).")
@click.option("--no-clip-search", is_flag=True, help="Plain min/max grid instead of the MSE clipping search.")
@click.option("--batch-size", type=int, default=8, show_default=True, help="Calibration sequences per forward.")
@click.option("--force", is_flag=True, help="Replace an existing output folder.")
@device_option
def quantize_command(model, method, bits, group_size, sym, act_order, fmt, out, data, samples, seqlen, seed, ignore,
                     block_size, damp, no_sequential, no_clip_search, batch_size, force, device):
    """Quantize MODEL's decoder-layer weights to BITS-bit integers with GPTQ or RTN and save it to --out.

    MODEL is a Hugging Face folder, a GGUF file or the alias smollm2-135m.
    """
    from compress.errors import CompressError
    from compress.export import check_output_path
    from compress.methods.base import build_method
    from compress.methods.quantize.export import check_exportable, check_not_quantized
    from compress.methods.quantize.targets import check_ignore_patterns, layer_targets
    from compress.models import check_llama_like, decoder_layers, load_model, resolve_model_path

    options = {"bits": bits, "group_size": group_size, "sym": sym, "ignore": list(ignore),
               "clip_search": not no_clip_search}
    if method == "gptq":
        options.update(act_order=act_order, block_size=block_size, damp=damp, sequential=not no_sequential)
    elif act_order:
        raise CompressError("--act-order needs --method gptq (RTN has no column order)")
    quant = build_method(method, options)  # validates bits, group size, ... before any loading
    path = resolve_model_path(model)
    check_output_path(out, [path], force)
    check_not_quantized(path)
    if batch_size <= 0:
        raise CompressError(f"--batch-size must be positive, got {batch_size}")
    loaded = load_model(path)
    check_llama_like(loaded.model)
    check_ignore_patterns(loaded.model, quant.config.ignore)
    targets = [f"model.layers.{i}.{n}" for i, layer in enumerate(decoder_layers(loaded.model))
               for n in layer_targets(layer, i, quant.config.ignore)]
    if not targets:
        raise CompressError("the ignore patterns leave no Linear module to quantize")
    check_exportable(loaded.model, targets, bits, group_size, fmt)
    tokens = _calibration(loaded, method, data, samples, seqlen, seed)
    result, layer_seconds = _walk(loaded.model, tokens, quant, device, batch_size)
    record = {"command": "quantize", "source": str(model), "method": method, "config": quant.config,
              "format": fmt, "calibration": {"data": data if method == "gptq" else None, "samples": int(tokens.shape[0]),
                                             "seqlen": int(tokens.shape[1]), "seed": seed},
              "seconds": result.seconds, "layers": result.records}
    saved = _save(loaded, fmt, out, record, path, force, quant.config)
    _closing_table(result.records, layer_seconds, path, saved, result.seconds, method)


def _calibration(loaded, method, data, samples, seqlen, seed):
    import torch

    from compress.data import calibration_tokens

    if method == "rtn":  # data-free: the walk only needs some tokens to move from layer to layer
        return torch.zeros(1, 8, dtype=torch.long)
    return calibration_tokens(loaded.model, loaded.tokenizer, data, samples, seqlen, seed)


def _walk(model, tokens, quant, device, batch_size):
    from compress.walk import walk

    layer_seconds = []
    last = [time.perf_counter()]

    def timed(index, layer):
        now = time.perf_counter()
        layer_seconds.append(now - last[0])
        last[0] = now

    result = walk(model, tokens, [quant], device=device, batch_size=batch_size, on_layer_done=timed)
    return result, layer_seconds


def _save(loaded, fmt, out, record, path, force, config):
    from compress.methods.quantize.export import save_compressed_tensors, save_gptq

    if fmt == "gptq":
        return save_gptq(loaded.model, loaded.tokenizer, out, record, path, force,
                         act_order=getattr(config, "act_order", False), sequential=getattr(config, "sequential", True),
                         damp=getattr(config, "damp", 0.0), static_groups=getattr(config, "static_groups", True))
    return save_compressed_tensors(loaded.model, loaded.tokenizer, out, record, path, force)


def _closing_table(records, layer_seconds, source, saved, seconds, method):
    from evaluation.cost import bytes_on_disk

    key = "output_err" if method == "gptq" else "weight_err"
    rows = []
    for record, secs in zip(records, layer_seconds):
        errors = [v[key] for v in record.get(method, {}).values()]
        if errors:
            rows.append((record["layer"], len(errors), sum(errors) / len(errors), max(errors), round(secs, 2)))
    print_table(rows, ("layer", "modules", f"mean {key}", f"max {key}", "seconds"))
    before, after = bytes_on_disk(source), bytes_on_disk(saved)
    click.echo("")
    print_table([("size on disk before (MB)", before / 1e6), ("size on disk after (MB)", after / 1e6),
                 ("ratio", after / max(before, 1)), ("walk seconds", seconds), ("saved to", str(saved))],
                ("summary", "value"))


def register(group: click.Group) -> None:
    group.add_command(quantize_command)
