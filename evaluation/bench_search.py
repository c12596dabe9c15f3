"""Benchmark: LLaMA-NAS search (``compress search``) against structured pruning at matched size.

One run, one process, the same calibration tokens for every row (``--samples`` × ``--seqlen`` windows of
the WikiText-2 train excerpt, seed 0: the search's own calibration). Per budget B (a fraction of the
parent's decoder parameters):

* search (plain): the front member within B (``compress search export --budget B --compensate none``), the
  parent's weights sliced;
* search + refit: the same member as the search scored it (the default ``--compensate searched``: with OBS
  candidates the kept o_proj/down_proj columns refit to the parent's outputs);
* search + slimgpt: the same widths, weights re-derived by SlimGPT's OBS (``--compensate slimgpt``); and with
  SlimGPT's bias setting (``--compensate slimgpt-bias``);
* search + refit + distill: then ``--distill`` steps of KD from the parent;
* SlimGPT log (the paper), SlimGPT log + bias (the best setting of bench_prune at 50 %), FLAP and ShortGPT
  at ratio 1 − B on the same tokens;
* at one budget, a second search after ``--supernet-steps`` of super-network training.

Measured on WikiText-2 test: perplexity at 2048 over the first ``--windows`` windows; KL(parent ‖ model)
per token and top-1 agreement over the first ``--kl-windows`` windows of ``--kl-seqlen`` tokens (the
parent's log-probabilities cached once); prefill (512 tokens) and decode (32 tokens) tokens/s, best of
2, divided by the parent's in the same run; wall time of each step. Then Kendall's τ between the
search's proxy (and its calibration KL) and the perplexity of ``--tau`` exported front members (as scored).

Every finished row is appended to ``--work``/rows.jsonl; ``--resume`` continues a cut-off run after its last
finished row (the search from its own checkpoint; speed ratios against the parent timed in the new process).

    python -m evaluation.bench_search --out evaluation/results/search-smollm2.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import compress
from compress.data import calibration_tokens, evaluation_stream
from compress.metrics.cost import tokens_per_second
from compress.metrics.perplexity import perplexity
from compress.models import load_model, resolve_model_path
from compress.search.export import export_subnet
from compress.search.run import Search, SearchConfig

BASELINES = {"slimgpt-log": ("slimgpt", {"schedule": "log"}),
             "slimgpt-log-bias": ("slimgpt", {"schedule": "log", "bias": True}),
             "flap": ("flap", {}), "shortgpt": ("shortgpt", {})}


def kendall_tau(x: list[float], y: list[float]) -> float:
    """Kendall's τ-b."""
    from scipy.stats import kendalltau

    return float(kendalltau(x, y).statistic)


class Meter:
    def __init__(self, args, tokenizer, parent):
        self.args = args
        stream = evaluation_stream(tokenizer, "wikitext2")
        self.stream = stream
        n = args.kl_seqlen
        self.kl_ids = stream[: n * args.kl_windows].reshape(args.kl_windows, n)
        with torch.no_grad():
            self.parent_logp = [F.log_softmax(parent(input_ids=ids[None]).logits[0].float(), -1) for ids in self.kl_ids]
        tokens_per_second(parent)  # warm-up: a cold first timing made the parent 1.2-1.4x faster than itself
        self.parent_speed = tokens_per_second(parent)

    @torch.no_grad()
    def __call__(self, model) -> dict:
        model.eval()
        start = time.perf_counter()
        ppl = perplexity(model, self.stream, 2048, windows=self.args.windows).perplexity
        kl, agree, count = 0.0, 0, 0
        for ids, logp in zip(self.kl_ids, self.parent_logp):
            logq = F.log_softmax(model(input_ids=ids[None]).logits[0].float(), -1)
            kl += float(F.kl_div(logq, logp, reduction="sum", log_target=True))
            agree += int((logq.argmax(-1) == logp.argmax(-1)).sum())
            count += ids.numel()
        prefill, decode = tokens_per_second(model)
        params = sum(p.numel() for layer in model.model.layers for p in layer.parameters())
        return {"ppl": ppl, "kl": kl / count, "top1": agree / count, "prefill": prefill / self.parent_speed[0],
                "decode": decode / self.parent_speed[1], "decoder_params": params,
                "eval_seconds": round(time.perf_counter() - start, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.85, 0.7, 0.55])
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--population", type=int, default=16)
    ap.add_argument("--generations", type=int, default=8)
    ap.add_argument("--refine", type=int, default=24, help="the search's stage-3 evaluations per budget")
    ap.add_argument("--rows", nargs="+", default=["all"],
                    help="measure only these rows (names as in the table: search, search+refit, search+slimgpt, "
                         "search+slimgpt-bias, search+refit+distill, slimgpt-log, slimgpt-log-bias, flap, shortgpt; "
                         "'supernet', 'tau'), or one row at one budget (slimgpt-log-0.55); default all")
    ap.add_argument("--windows", type=int, default=40, help="perplexity windows of 2048 tokens")
    ap.add_argument("--kl-windows", type=int, default=4)
    ap.add_argument("--kl-seqlen", type=int, default=512)
    ap.add_argument("--distill", type=int, default=20, help="KD steps of the distilled rows")
    ap.add_argument("--supernet-steps", type=int, default=20)
    ap.add_argument("--supernet-budget", type=float, default=0.7)
    ap.add_argument("--supernet-generations", type=int, default=3, help="generations of the search after it")
    ap.add_argument("--tau", type=int, default=10, help="front members exported for Kendall's τ")
    ap.add_argument("--work", default="/tmp/bench_search")
    ap.add_argument("--out", default=None, help="append the results (markdown) to this file")
    ap.add_argument("--prune-samples", type=int, default=32,
                    help="calibration of the pruning baselines: the same tokens as --compensate slimgpt's")
    ap.add_argument("--prune-seqlen", type=int, default=256)
    ap.add_argument("--baselines-only", action="store_true",
                    help="only the pruning baselines at every budget (and the parent), on the pruning calibration")
    ap.add_argument("--baselines", nargs="+", default=list(BASELINES), help="with --baselines-only: which")
    ap.add_argument("--reuse-search", action="store_true",
                    help="keep --work/run from an earlier run with the same settings: the search replays from its "
                         "recorded scores (its first run's wall time is reported)")
    ap.add_argument("--speed-only", action="store_true",
                    help="only time the parent and the exported models a previous run left in --work (one process, "
                         "--rounds interleaved rounds): for an idle machine after a contended full run")
    ap.add_argument("--rounds", type=int, default=5,
                    help="with --speed-only: rounds; each times the parent, then every model (best of 2), and the "
                         "ratios are the median over rounds of model ÷ that round's parent")
    ap.add_argument("--resume", action="store_true",
                    help="continue a cut-off run in --work: finished rows (rows.jsonl) are kept, the search resumes")
    args = ap.parse_args()
    if args.speed_only:
        return speed_only(args)
    torch.manual_seed(0)
    work = Path(args.work)
    done: dict[str, dict] = {}
    if args.resume and (work / "rows.jsonl").is_file():
        settings = json.loads((work / "settings.json").read_text())
        ignored = {"resume", "out", "rounds", "rows"}  # how a run is continued or reported, not what it measures
        if {k: v for k, v in settings.items() if k not in ignored} != \
                {k: v for k, v in vars(args).items() if k not in ignored}:
            raise SystemExit(f"{work} holds a run with other settings: {settings}")
        for line in (work / "rows.jsonl").read_text().splitlines():
            row = json.loads(line)
            done[row["key"]] = row
        print(f"resuming: {len(done)} finished rows", flush=True)
    elif args.reuse_search and (work / "run" / "search.json").is_file():
        for child in work.iterdir():
            if child.name != "run":
                shutil.rmtree(child)
    else:
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    if not done:
        (work / "settings.json").write_text(json.dumps(vars(args)))
    rows_file = (work / "rows.jsonl").open("a")

    def finished(key: str, row: dict) -> dict:
        row = {"key": key, **row}
        rows_file.write(json.dumps(row) + "\n")
        rows_file.flush()
        print(json.dumps(row), flush=True)
        return row

    def row_once(key: str, make) -> dict:
        """The row ``key``: from the resumed rows.jsonl, or ``make()`` measured now and recorded."""
        if key not in done:
            done[key] = finished(key, make())
        return done[key]
    started = time.perf_counter()
    source = resolve_model_path(args.model)
    loaded = load_model(source)
    parent, tokenizer = loaded.model, loaded.tokenizer
    tokens = calibration_tokens(parent, tokenizer, "wikitext2", args.samples, args.seqlen, 0)
    prune_tokens = calibration_tokens(parent, tokenizer, "wikitext2", args.prune_samples, args.prune_seqlen, 0)
    meter = Meter(args, tokenizer, parent)
    rows = [row_once("parent", lambda: {"row": "parent", "budget": 1.0, **meter(parent), "seconds": 0.0})]
    if args.baselines_only:
        def pruned(name, budget):
            method, options = BASELINES[name]
            model = load_model(source, tokenizer=False).model
            start = time.perf_counter()
            compress.prune(model, method=method, tokens=prune_tokens, device="cpu", ratio=round(1 - budget, 4),
                           **options)
            return {"row": name, "budget": budget, **meter(model), "seconds": round(time.perf_counter() - start, 1)}
        for budget in args.budgets:
            for name in args.baselines:
                rows.append(row_once(f"{name}-{budget}", lambda: pruned(name, budget)))
        return report_baselines(args, rows)
    def plain_forward():
        start = time.perf_counter()
        with torch.no_grad():
            for b in range(0, tokens.shape[0], 8):
                parent(input_ids=tokens[b:b + 8], use_cache=False)
        return {"seconds": time.perf_counter() - start}
    forward = row_once("forward", plain_forward)["seconds"]
    parent = None  # its memory back before the search loads its own copy

    config = SearchConfig(budgets=sorted(args.budgets), population=args.population, generations=args.generations,
                          samples=args.samples, seqlen=args.seqlen, refine=args.refine)
    resume = (work / "run" / "search.json").is_file()
    if not resume:
        shutil.rmtree(work / "run", ignore_errors=True)  # cut off before its first record
    record = Search(args.model, work / "run", config, device="cpu", resume=resume).run()
    search_seconds = record["seconds"]  # over the runs that searched: a finished search replayed keeps its own
    print(f"search: {search_seconds:.0f} s, {len(record['candidates'])} candidates", flush=True)

    def wanted(name: str, budget: float | None = None) -> bool:
        return "all" in args.rows or name in args.rows or f"{name}-{budget}" in args.rows

    def add(key, name, budget, build):
        if not wanted(name.split("(")[0], budget):
            return

        def make():
            start = time.perf_counter()
            folder_or_model = build()
            seconds = time.perf_counter() - start
            model = compress.load(folder_or_model).model if isinstance(folder_or_model, (str, Path)) \
                else folder_or_model
            return {"row": name, "budget": budget, **meter(model), "seconds": round(seconds, 1)}
        rows.append(row_once(key, make))

    def export(name, budget, **options):
        out = work / f"{name}-{budget}"
        shutil.rmtree(out, ignore_errors=True)  # a half-written export of a cut-off run
        return export_subnet(work / "run", out, budget=budget, device="cpu", **options)

    def baseline(name, budget, method, options):
        model = load_model(source, tokenizer=False).model
        compress.prune(model, method=method, tokens=prune_tokens, device="cpu", ratio=round(1 - budget, 4), **options)
        shutil.rmtree(work / f"{name}-{budget}", ignore_errors=True)
        compress.save(model, work / f"{name}-{budget}")  # for --speed-only (inside the row's seconds: small)
        return model

    searched = (("search", {"compensate": "none"}), ("search+refit", {"compensate": "searched"}),
                ("search+slimgpt", {"compensate": "slimgpt"}), ("search+slimgpt-bias", {"compensate": "slimgpt-bias"}),
                ("search+refit+distill", {"compensate": "searched", "distill": args.distill}))
    for budget in args.budgets:
        for name, options in searched:
            add(f"{name}-{budget}", name, budget, lambda: export(name, budget, **options))
        for name, (method, options) in BASELINES.items():
            add(f"{name}-{budget}", name, budget, lambda: baseline(name, budget, method, options))

    # a short super-network training, then the same search and export at one budget
    def supernet():
        config_super = SearchConfig(budgets=[args.supernet_budget], population=args.population,
                                    generations=args.supernet_generations, samples=args.samples, seqlen=args.seqlen,
                                    supernet_steps=args.supernet_steps)
        shutil.rmtree(work / "run-supernet", ignore_errors=True)
        shutil.rmtree(work / "supernet-export", ignore_errors=True)
        Search(args.model, work / "run-supernet", config_super, device="cpu").run()
        return export_subnet(work / "run-supernet", work / "supernet-export", budget=args.supernet_budget,
                             device="cpu")

    add("supernet", f"supernet({args.supernet_steps})+search+refit", args.supernet_budget, supernet)

    # Kendall's τ: the search's proxy and calibration KL against held-out perplexity of front members
    front = record["front"]
    picks = sorted({round(i * (len(front) - 1) / max(args.tau - 1, 1)) for i in range(args.tau)})
    tau_rows = []
    if not wanted("tau"):
        picks = []

    def tau_row(k):
        shutil.rmtree(work / f"tau-{k}", ignore_errors=True)
        folder = export_subnet(work / "run", work / f"tau-{k}", pick=k, device="cpu")
        ppl = perplexity(compress.load(folder).model, meter.stream, 2048, windows=args.windows).perplexity
        shutil.rmtree(folder)
        return {"pick": k, "params": front[k]["params"], "proxy": front[k]["proxy"], "kl": front[k]["kl"], "ppl": ppl}
    for k in picks:
        tau_rows.append(row_once(f"tau-{k}", lambda: tau_row(k)))
    tau_proxy = kendall_tau([r["proxy"] for r in tau_rows], [r["ppl"] for r in tau_rows]) if tau_rows else None
    tau_kl = kendall_tau([r["kl"] for r in tau_rows], [r["ppl"] for r in tau_rows]) if tau_rows else None
    report(args, rows, tau_rows, tau_proxy, tau_kl, record, search_seconds, forward, time.perf_counter() - started)


def emit(lines: list[str], out: str | None) -> None:
    """Print a result section and append it to ``out`` (markdown) when given."""
    text = "\n".join(lines) + "\n"
    print(text)
    if out:
        with open(out, "a") as f:
            f.write(text)


def report_baselines(args, rows) -> None:
    import os

    lines = [f"\n## {datetime.date.today()} — `python -m evaluation.bench_search --baselines-only --windows "
             f"{args.windows}` (baselines on the compensation's calibration)\n",
             f"The pruning baselines calibrated on {args.prune_samples} × {args.prune_seqlen} WikiText-2 train tokens "
             "(seed 0): the same tokens `--compensate slimgpt` uses, so these rows compare with the search + "
             f"compensate rows above. Same metrics; load average at the end {os.getloadavg()[0]:.1f}.\n",
             "| row | budget | decoder params | ppl@2048 | KL | top-1 | seconds |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['row']} | {r['budget']:.2f} | {r['decoder_params'] / 1e6:.1f} M | {r['ppl']:.2f} | {r['kl']:.3f} | "
              f"{r['top1']:.3f} | {r['seconds']} |" for r in rows]
    emit(lines, args.out)


def speed_only(args) -> None:
    """Interleaved timing: every round times the parent and then each exported model, so a drift of the machine's
    speed (thermal, another process) lands on both sides of a ratio; the reported ratio is the median over rounds
    and the prefill column also gives the rounds' spread (min–max)."""
    import os
    import statistics

    work = Path(args.work)
    folders = sorted(p for p in work.iterdir() if p.is_dir() and (p / "compress.json").is_file()
                     and (p / "config.json").is_file())  # exported models, not the search folders
    if not folders:
        raise SystemExit(f"no exported models in {work}: run the full benchmark first")
    if args.rounds < 1:
        raise SystemExit(f"--rounds must be at least 1, got {args.rounds}")

    def speeds(model):
        """(prefill with the last position's logits, decode, prefill with every position's logits)."""
        last = tokens_per_second(model, repeats=2, all_logits=False)
        return last[0], last[1], tokens_per_second(model, decode_steps=1, repeats=2)[0]
    parent = load_model(resolve_model_path(args.model), tokenizer=False).model.eval()
    models = {folder.name: compress.load(folder).model.eval() for folder in folders}
    load_start = os.getloadavg()[0]
    speeds(parent)  # warm-up
    ratios: dict[str, list[tuple[float, float, float]]] = {name: [] for name in models}
    bases = []
    for round_ in range(args.rounds):
        base = speeds(parent)
        bases.append(base)
        for name, model in models.items():
            got = speeds(model)
            ratios[name].append(tuple(g / b for g, b in zip(got, base)))
        print(f"round {round_ + 1}/{args.rounds}: parent prefill {base[0]:.0f} tok/s", flush=True)
    base = [statistics.median(b[i] for b in bases) for i in range(3)]
    lines = [f"\n## {datetime.date.today()} — `python -m evaluation.bench_search --speed-only --rounds {args.rounds}` "
             "(idle timing)\n",
             f"The models the run above exported, timed again in one process: prefill of 512 tokens and 32 decode "
             f"steps, batch 1, best of 2, in {args.rounds} interleaved rounds (each round times the parent, then every "
             "model; a ratio is the median over rounds of model ÷ that round's parent, the prefill's min–max over "
             f"rounds in brackets); load average {load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end. "
             "Prefill as `generate` runs it: logits of the last position only (`logits_to_keep=1`); the last column "
             f"computes all 512 positions' logits, where the {parent.lm_head.weight.numel() / 1e6:.1f} M-parameter LM "
             f"head, which no row prunes, is a fixed share. Parent (median of rounds): prefill {base[0]:.0f} tok/s "
             f"({base[2]:.0f} with all logits), decode {base[1]:.1f} tok/s.\n",
             "| model | decoder params | prefill × [min–max] | decode × | prefill × (all logits) |",
             "|---|---|---|---|---|"]
    for name, model in models.items():
        params = sum(p.numel() for layer in model.model.layers for p in layer.parameters())
        r = ratios[name]
        med = [statistics.median(x[i] for x in r) for i in range(3)]
        lines.append(f"| {name} | {params / 1e6:.1f} M | {med[0]:.2f} [{min(x[0] for x in r):.2f}–"
                     f"{max(x[0] for x in r):.2f}] | {med[1]:.2f} | {med[2]:.2f} |")
    emit(lines, args.out)


def report(args, rows, tau_rows, tau_proxy, tau_kl, record, search_seconds, forward, total) -> None:
    import os

    load = os.getloadavg()[0]
    import sys

    lines = [f"\n## {datetime.date.today()} — `python -m evaluation.bench_search {' '.join(sys.argv[1:])}`\n",
             f"Machine: 2-core CPU, no GPU; load average at the end {load:.1f} (tokens/s ratios are within this "
             "run). Calibration: "
             f"{args.samples} × {args.seqlen} WikiText-2 train tokens (seed 0), the same for every row. Perplexity at "
             f"2048 over the first {args.windows} test windows; KL / top-1 over {args.kl_windows} × {args.kl_seqlen} "
             "test tokens; prefill 512 / decode 32 tokens/s ÷ the parent's. Search: population "
             f"{args.population}, {args.generations} generations, then {args.refine} refinement evaluations per budget, "
             f"{len(record['candidates'])} candidates, "
             f"{search_seconds:.0f} s = {search_seconds / forward:.0f}× one plain forward over the calibration "
             f"tokens ({forward:.1f} s); candidates scored as {record['config'].get('candidates', 'slice')} "
             f"(profiling walk and refit on {record['config'].get('obs_samples')} × "
             f"{record['config'].get('obs_seqlen')} tokens of the same source and seed). SlimGPT, FLAP, ShortGPT and "
             f"`--compensate slimgpt` calibrate on {args.prune_samples} × {args.prune_seqlen} of them. Whole "
             f"benchmark: {total / 60:.0f} min{' (resumed)' if args.resume else ''}.\n",
             "| row | budget | decoder params | ppl@2048 | KL | top-1 | prefill × | decode × | seconds |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['row']} | {r['budget']:.2f} | {r['decoder_params'] / 1e6:.1f} M | {r['ppl']:.2f} | "
                     f"{r['kl']:.3f} | {r['top1']:.3f} | {r['prefill']:.2f} | {r['decode']:.2f} | {r['seconds']} |")
    if tau_rows:
        lines += ["", f"Kendall τ over {len(tau_rows)} exported front members (as scored): proxy vs perplexity "
                  f"**{tau_proxy:.2f}**, calibration KL vs perplexity **{tau_kl:.2f}**.", "",
                  "| pick | params | proxy | calib KL | ppl@2048 |", "|---|---|---|---|---|"]
        lines += [f"| {r['pick']} | {r['params']:.3f} | {r['proxy']:.3f} | {r['kl']:.4f} | {r['ppl']:.2f} |"
                  for r in tau_rows]
    emit(lines, args.out)


if __name__ == "__main__":
    main()
