"""``compress transfer``: add a fine-tuning diff of one model version to the base of another.

``compress transfer --source-base A --source-ft B --target-base C --out D`` does the transfer;
``compress transfer extract`` writes the diff as a (low-rank) artifact and ``compress transfer
apply`` adds an artifact to a target base.
"""

from __future__ import annotations

import math

import click

from compress.cli.common import print_table
from compress.errors import CompressError

REPORT_ROWS = 8  # tensors shown (largest drift first); compress.json holds them all


class FieldOption(click.Option):
    """A flag whose default and help text are those of a TransferOptions field (one set of defaults for
    the command, ``transfer()`` and the recipe method). They are read the first time click needs them,
    because the options module imports torch, which ``compress --help`` should not wait for."""

    def __init__(self, *args, field: str, **kwargs):
        # a default given here wins (the model flags default to None, "not given", not to the field's "")
        self.field, self._loaded, self._own_default = field, False, "default" in kwargs
        super().__init__(*args, **kwargs)

    def _load(self, help_page: bool = False) -> None:
        if not self._loaded:
            def read():
                from compress.methods.transfer import options

                return [options.default(self.field), options.help_text(self.field)]

            if help_page:  # a help page may read them from the help cache, without importing torch
                from compress.cli.help_cache import cached

                default, help_text = cached(f"transfer:{self.field}", read)
            else:
                default, help_text = read()
            if not self._own_default:
                self.default = default
            self.help = self.help or help_text
            self._loaded = True

    def get_default(self, ctx, call=True):
        self._load()
        return super().get_default(ctx, call)

    def get_help_record(self, ctx):
        self._load(help_page=True)
        return super().get_help_record(ctx)


def field_option(*decls, field: str, **kwargs):
    return click.option(*decls, cls=FieldOption, field=field, show_default=True, **kwargs)


scale_option = field_option("--scale", field="scale", type=float)
include_option = field_option("--include", field="include")
exclude_option = field_option("--exclude", field="exclude")
vocab_option = field_option("--vocab", field="vocab", type=click.Choice(["pad", "truncate", "error"]))
rank_option = field_option("--rank", field="rank", type=int)
force_option = click.option("--force", is_flag=True, help="Replace an existing --out folder.")


def echo_report(report, label: str = "diff") -> None:
    """The compatibility report: the whole model, then the tensors that moved most between versions."""
    total = report.total()
    rows = [(r["tensor"], r["delta_rel"], r["drift_rel"], r["cosine"], r.get("kept_energy", ""))
            for r in [total, report.median()] + report.rows(top=REPORT_ROWS)]
    click.echo(f"compatibility report ({len(report.tensors)} tensors; ‖Δ‖/‖θ_base‖, ‖target − base‖/‖θ_base‖):")
    print_table(rows, ("tensor", "delta_rel", "drift_rel", "cosine", "kept_energy"))
    for warning in report.warnings():
        click.echo(f"warning: {warning}", err=True)
    if math.isnan(total["drift_rel"]):
        click.echo(f"(applying a {label}: sizes are relative to the target base; the source base is not known)")


@click.group("transfer", invoke_without_command=True)
@field_option("--source-base", field="source_base", default=None)
@field_option("--source-ft", field="source_ft", default=None)
@click.option("--target-base", default=None, help="Base model of the target version (its config is kept).")
@click.option("--out", default=None, help="Output folder (never one of the inputs).")
@scale_option
@include_option
@exclude_option
@vocab_option
@rank_option
@click.option("--report-only", is_flag=True, help="Print the compatibility report and write nothing.")
@force_option
@click.pass_context
def transfer_group(ctx, source_base, source_ft, target_base, out, scale, include, exclude, vocab, rank,
                   report_only, force):
    """Add the diff (SOURCE-FT − SOURCE-BASE) to TARGET-BASE: fine-tuning transfer without training.

    Config from the target base, tokenizer and chat template from the fine-tuned model. Tensors
    are streamed, so memory stays at a few tensor blocks. Subcommands extract/apply work with a
    diff artifact instead.
    """
    if ctx.invoked_subcommand is not None:
        given = [n for n, v in (("--source-base", source_base), ("--source-ft", source_ft),
                                ("--target-base", target_base), ("--out", out)) if v is not None]
        if given:
            raise CompressError(f"{given[0]} goes after the subcommand: compress transfer {ctx.invoked_subcommand} ...")
        return
    missing = [n for n, v in (("--source-base", source_base), ("--source-ft", source_ft),
                              ("--target-base", target_base)) if v is None]
    if not report_only and out is None:
        missing.append("--out")
    if missing:
        raise CompressError(f"compress transfer needs {', '.join(missing)} (see compress transfer --help)")
    from compress.methods.transfer import TransferOptions, transfer

    options = TransferOptions(source_base=source_base, source_ft=source_ft, scale=scale, include=include,
                              exclude=exclude, vocab=vocab, rank=rank)
    transfer(source_base, source_ft, target_base, None if report_only else out, options, force=force,
             on_report=echo_report)
    if not report_only:
        click.echo(f"wrote {out}")


@transfer_group.command("extract")
@field_option("--source-base", field="source_base", required=True)
@field_option("--source-ft", field="source_ft", required=True)
@click.option("--out", required=True, help="Artifact folder to write.")
@field_option("--rank", field="rank", type=int, help="Store each matrix's diff as a rank-K truncated SVD.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16", "float64"]), default="float32",
              show_default=True, help="Storage dtype of the diff.")
@include_option
@exclude_option
@force_option
def extract_command(source_base, source_ft, out, rank, dtype, include, exclude, force):
    """Write the diff SOURCE-FT − SOURCE-BASE as a small artifact (low-rank with --rank)."""
    from compress.methods.transfer import TransferOptions, extract

    options = TransferOptions(source_base=source_base, source_ft=source_ft, rank=rank, include=include,
                              exclude=exclude)
    description = extract(source_base, source_ft, out, options, dtype=dtype, force=force)
    kept = [m["kept_energy"] for m in description["tensors"].values() if "kept_energy" in m]
    if kept:
        click.echo(f"rank {rank}: kept energy min {min(kept):.4g}, mean {sum(kept) / len(kept):.4g} "
                   f"over {len(kept)} matrices")
    click.echo(f"wrote {out}")


@transfer_group.command("apply")
@click.option("--diff", "diff", required=True, help="Artifact folder written by compress transfer extract.")
@click.option("--target-base", required=True, help="Base model of the target version.")
@click.option("--out", required=True, help="Output folder (never one of the inputs).")
@scale_option
@include_option
@exclude_option
@vocab_option
@force_option
def apply_command(diff, target_base, out, scale, include, exclude, vocab, force):
    """Add λ times the diff artifact DIFF to TARGET-BASE."""
    from compress.methods.transfer import TransferOptions, apply

    options = TransferOptions(scale=scale, include=include, exclude=exclude, vocab=vocab)
    apply(diff, target_base, out, options, force=force,
          on_report=lambda report: echo_report(report, "diff artifact"))
    click.echo(f"wrote {out}")


def register(group: click.Group) -> None:
    group.add_command(transfer_group)
