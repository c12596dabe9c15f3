"""``compress run RECIPE.yaml``: the whole job of a recipe (stages, export, evaluation) in one command."""

from __future__ import annotations

import click

from compress.cli.common import print_table


@click.command("run")
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--out", default=None, help="Output folder (overrides the recipe's 'out').")
@click.option("--force", is_flag=True, help="Replace the output folder if it exists.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=None,
              help="auto (CUDA when present, else CPU), cpu or cuda (overrides the recipe's 'device').")
@click.option("--dry-run", is_flag=True, help="Run every check that needs no data (on the model's shapes, its "
              "weights not loaded), print the plan and stop.")
def run_command(recipe, out, force, device, dry_run):
    """Run RECIPE: load the model, run its stages (consecutive layer-wise stages in one layer walk),
    export, evaluate, and write the recipe beside the output as recipe.yaml.

    Everything is validated before any work; a bad recipe is one line on stderr and exit code 2.
    """
    from compress.pipeline import preflight, run_job
    from compress.recipe import check_without_data, describe, load_recipe, output_folder

    parsed = load_recipe(recipe)
    folder = output_folder(parsed, out)
    dev = device or parsed.device
    source = preflight(parsed, folder, force)
    if dry_run:  # every check of a real run that needs no data, on the model's skeleton; nothing written
        from compress.export import release_output

        try:
            fmt = check_without_data(parsed, source)
        finally:
            release_output(folder)
        for line in describe(parsed, folder, dev, fmt):
            click.echo(line)
        return
    result = run_job(parsed, folder, force=force, device=dev, source=source)
    _closing_table(result, source)


def _closing_table(result, source) -> None:
    from compress.metrics.cost import bytes_on_disk

    rows, walks = [], {}
    for i, s in enumerate(result.steps, 1):  # stages that shared one walk: one row, its time once
        if s["walk"] and s["walk"] in walks:
            row = rows[walks[s["walk"]]]
            rows[walks[s["walk"]]] = (f"{row[0]}-{i}", f"{row[1]} → {s['method']}", row[2], row[3])
            continue
        if s["walk"]:
            walks[s["walk"]] = len(rows)
        rows.append((str(i), s["method"], "layer walk %d" % s["walk"] if s["walk"] else "whole model", s["seconds"]))
    print_table(rows, ("stage", "method", "ran in", "seconds"))
    click.echo("")
    before, after = result.parameters
    totals = [("parameters before", before), ("parameters after", after),
              ("layer walks", result.walks),
              ("size on disk before (MB)", bytes_on_disk(source) / 1e6),
              ("size on disk after (MB)", bytes_on_disk(result.folder) / 1e6)]
    for p in result.metrics.get("perplexity", []):
        totals.append((f"perplexity ({p['data']} @ {p['seqlen']}, {p['windows']} windows)", p["perplexity"]))
    fid = result.metrics.get("fidelity")
    if fid:
        totals += [(f"KL vs {fid['reference']} (nats)", fid["kl_divergence"]),
                   ("top-1 agreement", fid["top1_agreement"])]
    totals.append(("saved to", str(result.folder)))
    print_table(totals, ("summary", "value"))


def register(group: click.Group) -> None:
    group.add_command(run_command)
