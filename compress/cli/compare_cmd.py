"""``compress compare``: output folders side by side, on their recorded protocols or measured on one."""

from __future__ import annotations

import click

from compress.cli.common import device_option, print_json, print_table


@click.command("compare")
@click.argument("outputs", nargs=-1, required=True)
@click.option("--eval", "eval_data", default=None,
              help="Measure every folder on this text (wikitext2, a text/JSON-lines file or a folder) with one "
                   "protocol, instead of reading the metrics their runs recorded.")
@click.option("--seqlen", type=int, default=None, help="With --eval: tokens per window. [default: 2048]")
@click.option("--windows", type=int, default=None, help="With --eval: score only the first K windows (default: all).")
@click.option("--reference", default=None, help="With --eval: reference model for KL divergence and top-1 agreement.")
@click.option("--plot", "plot_path", default=None, help="Write perplexity against size on disk to this file (.png).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of the table.")
@device_option
def compare_command(outputs, eval_data, seqlen, windows, reference, plot_path, as_json, device):
    """Compare OUTPUTS (folders written by compress, any method) in one table.

    Each row: the method(s) and their options, parameters, size on disk and the metrics the run
    measured with their protocol. Values measured on a protocol other than the one most folders
    share are marked '!' and named in a warning; --eval measures every folder on one protocol.
    """
    from compress.compare import FLAG, Comparison, compare_outputs
    from compress.errors import CompressError

    if eval_data is None and (seqlen is not None or windows is not None):
        raise CompressError("--seqlen and --windows set the protocol of --eval DATA; give --eval too")
    comparison = compare_outputs(list(outputs), eval_data=eval_data, seqlen=2048 if seqlen is None else seqlen,
                                 windows=windows,
                                 reference=reference, plot_path=plot_path, device=device)
    if as_json:
        print_json({**comparison.as_dict(), "plot": plot_path})
        return
    print_table(comparison.table(), Comparison.HEADERS)
    for warning in comparison.warnings:
        click.echo(f"warning: {warning}", err=True)
    if any(r.perplexity_flagged or r.fidelity_flagged for r in comparison.rows):
        click.echo(f"{FLAG}: measured on another protocol than the other outputs (not comparable)")
    if plot_path is not None:
        click.echo(f"plot: {plot_path}")


def register(group: click.Group) -> None:
    group.add_command(compare_command)
