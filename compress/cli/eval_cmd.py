"""``compress eval``: perplexity, fidelity against a reference, and cost of a model."""

from __future__ import annotations

import time

import click

from compress.cli.common import device_option, print_json, print_table, seqlen_option


@click.command("eval")
@click.argument("model")
@click.option("--data", default="wikitext2", show_default=True,
              help="Evaluation text: wikitext2 (the local test split), a text/JSON-lines file or a folder.")
@seqlen_option
@click.option("--windows", type=int, default=None, help="Score only the first K windows (default: all).")
@click.option("--stride", type=int, default=None, help="Window stride in tokens (default: seqlen, non-overlapping).")
@click.option("--batch-size", type=int, default=1, show_default=True, help="Windows per forward pass.")
@click.option("--reference", default=None, help="Reference model: adds kl_divergence and top1_agreement.")
@click.option("--cost", "with_cost", is_flag=True, help="Also measure parameters, size, KV cache and tokens/s.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
@device_option
def eval_command(model, data, seqlen, windows, stride, batch_size, reference, with_cost, as_json, device):
    """Measure MODEL: WikiText-2 perplexity with an explicit protocol, and more.

    MODEL is a Hugging Face folder, a GGUF file or the alias smollm2-135m.
    """
    started = time.perf_counter()
    from compress.metrics import evaluate

    result = evaluate(model, data=data, seqlen=seqlen, windows=windows, stride=stride, batch_size=batch_size,
                      reference=reference, cost=with_cost, device=device)
    result["seconds"] = time.perf_counter() - started  # the command's wall time, imports included
    if as_json:
        print_json(result)
        return
    rows = [(k, v) for k, v in result.items()]
    print_table(rows, ("metric", "value"))


def register(group: click.Group) -> None:
    group.add_command(eval_command)
