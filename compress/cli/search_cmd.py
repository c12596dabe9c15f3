"""``compress search``: LLaMA-NAS, a Pareto front of sub-networks; ``compress search export``: one of them."""

from __future__ import annotations

import click

from compress.cli.common import device_option, print_json, print_table
from compress.errors import CompressError


def _floats(text: str, flag: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise CompressError(f"{flag} takes comma-separated fractions such as 0.5,0.7,0.85, got {text!r}") from None


class SearchGroup(click.Group):
    """``compress search MODEL ...`` runs a search; ``compress search export RUN ...`` exports from one."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("-h", "--help"):
            args = ["run", *args]
        return super().parse_args(ctx, args)

    def format_usage(self, ctx, formatter):
        formatter.write_usage("compress search", "MODEL --out RUN [OPTIONS]  |  compress search export RUN ...")


@click.group("search", cls=SearchGroup, invoke_without_command=False)
def search_group():
    """LLaMA-NAS: search a pretrained LLaMA's sub-networks for the Pareto front of quality against size.

    \b
    compress search MODEL --out RUN [options]     the search (see compress search run --help)
    compress search export RUN --pick K --out DIR  write a front member as a model that loads
    """


@search_group.command("run")
@click.argument("model")
@click.option("--out", required=True, help="Run folder (search.json, front.json, front.png, compress.json).")
@click.option("--space", type=click.Choice(["llama-nas", "full"]), default="full", show_default=True,
              help="llama-nas: depth and per-layer FFN width (the paper); full: also attention width in GQA units.")
@click.option("--objectives", default="kl,params", show_default=True,
              help="Quality (kl or ppl on the calibration tokens) then costs (params, kv, latency).")
@click.option("--budget", "budget", default="0.5,0.7,0.85", show_default=True,
              help="Fractions of the parent's first cost (decoder parameters, KV bytes or latency) the search "
                   "targets; the solver seeds one sub-network per budget.")
@click.option("--population", type=int, default=16, show_default=True, help="NSGA-II population.")
@click.option("--generations", type=int, default=8, show_default=True, help="NSGA-II generations.")
@click.option("--refine", type=int, default=24, show_default=True,
              help="Then, per budget, this many evaluations of moves around the best candidate within it (0: none).")
@click.option("--ffn-step", type=int, default=None, help="FFN width step (default 64; 256 for FFN ≥ 8192).")
@click.option("--gqa-unit", type=click.Choice(["query", "kv"]), default="query", show_default=True,
              help="Attention unit: one query head of every KV group, or whole KV groups.")
@click.option("--min-depth", type=int, default=None, help="Fewest layers a sub-network keeps (default: half).")
@click.option("--candidates", type=click.Choice(["obs", "slice"]), default="obs", show_default=True,
              help="obs: score each candidate with its kept o_proj/down_proj columns refit to the parent's outputs "
                   "(OBS, from the profiling walk's Gram matrices); slice: the plain slice of the parent.")
@click.option("--obs-samples", type=int, default=32, show_default=True,
              help="With --candidates obs: samples of the profiling walk (importance, option scores, the refit's "
                   "Gram matrices), more than the KL's so that the refit does not fit the scoring tokens.")
@click.option("--obs-seqlen", type=int, default=256, show_default=True, help="Tokens per --obs-samples sample.")
@click.option("--data", default="wikitext2", show_default=True, help="Calibration text (or 'generate').")
@click.option("--samples", type=int, default=4, show_default=True, help="Calibration samples (the KL's tokens).")
@click.option("--seqlen", type=int, default=512, show_default=True, help="Tokens per calibration sample.")
@click.option("--batch-size", type=int, default=8, show_default=True, help="Samples per forward.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the data and of NSGA-II.")
@click.option("--supernet-steps", type=int, default=0, show_default=True,
              help="Train the shared weights first (full + one sampled sub-network per step, KD from the parent).")
@click.option("--supernet-lr", type=float, default=5e-5, show_default=True, help="Learning rate of --supernet-steps.")
@click.option("--compare", multiple=True, help="Another compressed model of the same parent (a folder; repeatable): "
                                              "scored on the same tokens and drawn on front.png.")
@click.option("--resume", is_flag=True, help="Continue the search in --out (same flags).")
@click.option("--json", "as_json", is_flag=True, help="Print the front as JSON.")
@device_option
def run_command(model, out, space, objectives, budget, population, generations, refine, ffn_step, gqa_unit, min_depth,
                candidates, obs_samples, obs_seqlen, data,
                samples, seqlen, batch_size, seed, supernet_steps, supernet_lr, compare, resume, as_json, device):
    """Search MODEL's sub-networks (depth, FFN width, attention width) for the Pareto front.

    Stage 1 scores every per-layer option once and a mixed-integer program picks the best combination
    per budget; stage 2 runs NSGA-II on the whole-model objectives, seeded with those picks; stage 3
    tries moves of units between layers around each budget's best candidate (--refine). The run folder
    is its own checkpoint (--resume).
    """
    from compress.search.run import Search, SearchConfig

    config = SearchConfig(space=space, gqa_unit=gqa_unit, objectives=[o.strip() for o in objectives.split(",")],
                          budgets=_floats(budget, "--budget"), population=population, generations=generations,
                          refine=refine, ffn_step=ffn_step, min_depth=min_depth, data=data, samples=samples, seqlen=seqlen,
                          batch_size=batch_size, seed=seed, supernet_steps=supernet_steps, supernet_lr=supernet_lr,
                          candidates=candidates, obs_samples=obs_samples, obs_seqlen=obs_seqlen)
    record = Search(model, out, config, device=device, resume=resume, compare=list(compare)).run()
    if as_json:
        print_json({"front": record["front"], "seconds": record["seconds"]})
        return
    q, cost = record["objectives"][0], record["objectives"][1]
    print_table([(r["pick"], r[cost], r[q], r["ppl"], r["depth"], r["parameters"], r.get("milp_budget") or "")
                 for r in record["front"]], ("pick", cost, q, "calib ppl", "layers", "decoder params", "seeded at"))
    if record.get("compare"):
        print_table([(p["label"], p[cost], p[q], p["ppl"], p["depth"], p["parameters"]) for p in record["compare"]],
                    ("compared", cost, q, "calib ppl", "layers", "decoder params"))
    click.echo(f"{len(record['candidates'])} candidates in {record['seconds']} s "
               f"(one forward over the calibration tokens: {record['forward_seconds']} s); front in {out}/front.json")


@search_group.command("export")
@click.argument("run")
@click.option("--pick", type=int, default=None, help="Front member K (the 'pick' column of front.json).")
@click.option("--budget", type=float, default=None, help="The best front member within this fraction of the cost.")
@click.option("--out", required=True, help="Output folder (must not exist unless --force).")
@click.option("--compensate", type=click.Choice(["searched", "none", "obs", "slimgpt", "slimgpt-bias"]),
              default="searched", show_default=True,
              help="searched: the candidate as the search scored it (obs or a plain slice, per its --candidates); "
                   "none: a plain slice; obs: the search's one-shot OBS refit; slimgpt: re-derive the kept "
                   "weights with SlimGPT's sequential OBS walk at the searched widths; slimgpt-bias: the same "
                   "walk on centred inputs plus an o_proj / down_proj bias (SlimGPT's bias setting).")
@click.option("--compensate-samples", type=int, default=32, show_default=True,
              help="Calibration samples of --compensate slimgpt (the search's data source and seed).")
@click.option("--compensate-seqlen", type=int, default=256, show_default=True,
              help="Tokens per calibration sample of --compensate slimgpt.")
@click.option("--distill", type=int, default=0, show_default=True,
              help="Steps of knowledge distillation from the parent (KL, full vocabulary) after the export.")
@click.option("--distill-lr", type=float, default=1e-4, show_default=True, help="Learning rate of --distill.")
@click.option("--distill-batch", type=int, default=4, show_default=True, help="Sequences per --distill step.")
@click.option("--model", default=None, help="The parent, when it moved since the search (checked).")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@device_option
def export_command(run, pick, budget, out, compensate, compensate_samples, compensate_seqlen, distill, distill_lr,
                   distill_batch, model, force, device):
    """Write front member --pick K (or the best within --budget B) of the search in RUN as a model."""
    from compress.search.export import export_subnet

    from compress.data import check_sizes

    check_sizes(compensate_samples, compensate_seqlen)
    folder = export_subnet(run, out, pick=pick, budget=budget, compensate=compensate,
                           compensate_samples=compensate_samples, compensate_seqlen=compensate_seqlen, distill=distill,
                           distill_lr=distill_lr, distill_batch=distill_batch, model=model, device=device,
                           force=force)
    click.echo(f"saved {folder}")


def register(main: click.Group) -> None:
    main.add_command(search_group)
