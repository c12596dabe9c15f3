"""Options and helpers shared by the CLI verbs."""

from __future__ import annotations

import json

import click

device_option = click.option("--device", default="auto", show_default=True,
                             help="auto (CUDA when present, else CPU), cpu or cuda.")


def calibration_options(default_data: str = "generate"):
    """--data/--samples/--seqlen/--seed/--batch-size: the calibration flags every walk verb shares."""
    options = [
        click.option("--data", default=default_data, show_default=True,
                     help="Calibration: 'generate' (text the model writes itself, data-free), wikitext2, c4, "
                          "or a text/JSON-lines file or folder."),
        click.option("--samples", type=int, default=128, show_default=True, help="Calibration samples."),
        click.option("--seqlen", type=int, default=512, show_default=True, help="Tokens per calibration sample."),
        click.option("--seed", type=int, default=0, show_default=True, help="Seed of the calibration windows."),
        click.option("--batch-size", type=int, default=8, show_default=True, help="Calibration samples per forward."),
    ]

    def decorate(fn):
        for option in reversed(options):
            fn = option(fn)
        return fn
    return decorate


seqlen_option = click.option("--seqlen", type=int, default=2048, show_default=True, help="Tokens per window.")


def print_table(rows: list[tuple], headers: tuple) -> None:
    """Print a small aligned table on stdout."""
    cells = [tuple(str(c) for c in headers)] + [tuple(_fmt(c) for c in row) for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for n, row in enumerate(cells):
        click.echo("  ".join(c.rjust(w) if n else c.ljust(w) for c, w in zip(row, widths)))
        if n == 0:
            click.echo("  ".join("-" * w for w in widths))


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.3e}"
    return str(value)


def print_json(obj: dict) -> None:
    click.echo(json.dumps(obj, indent=None, sort_keys=True))
