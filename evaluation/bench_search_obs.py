"""Benchmark: the search's OBS-scored candidates against SlimGPT at the same budgets, on held-out text.

Protocol (one process, smollm2-135m unless --model): ``compress search`` with the given settings and
``--candidates obs`` (the default); at every budget the best front member within it is exported twice,
as the search scored it (``--compensate searched``: its kept o_proj / down_proj columns refit by OBS on
the profiling walk's tokens) and with ``--compensate slimgpt`` (SlimGPT's sequential OBS walk at the
searched widths, on 32 × 256 tokens); SlimGPT with its log schedule prunes the parent at the same
budget on the same 32 × 256 tokens (source WikiText-2 train, seed 0). Every model: WikiText-2 test
perplexity at 2048 over the first ``--windows`` windows, decoder parameters.

    python -m evaluation.bench_search_obs --samples 4 --seqlen 512 --out evaluation/results/search-smollm2.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import time
from pathlib import Path

import torch

import compress
from compress.arch import decoder_layers
from compress.data import calibration_tokens
from compress.models import load_model, resolve_model_path
from compress.search.export import COMPENSATE_SAMPLES, COMPENSATE_SEQLEN, export_subnet
from compress.search.run import Search, SearchConfig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.85, 0.7, 0.55])
    ap.add_argument("--samples", type=int, default=SearchConfig.samples)
    ap.add_argument("--seqlen", type=int, default=SearchConfig.seqlen)
    ap.add_argument("--population", type=int, default=SearchConfig.population)
    ap.add_argument("--generations", type=int, default=SearchConfig.generations)
    ap.add_argument("--windows", type=int, default=5, help="perplexity windows of 2048 tokens")
    ap.add_argument("--work", default="/tmp/bench_search_obs")
    ap.add_argument("--out", default=None, help="append the results (markdown) to this file")
    args = ap.parse_args()
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    started = time.perf_counter()

    def measure(model) -> dict:
        return {"ppl": compress.evaluate(model, **protocol)["perplexity"],
                "decoder_params": sum(p.numel() for p in decoder_layers(model).parameters())}

    source = resolve_model_path(args.model)
    parent = load_model(source)
    protocol = dict(data="wikitext2", seqlen=2048, windows=args.windows, tokenizer=parent.tokenizer)
    rows = [{"row": "parent", "budget": 1.0, **measure(parent.model), "seconds": 0.0}]
    prune_tokens = calibration_tokens(parent.model, parent.tokenizer, "wikitext2", COMPENSATE_SAMPLES,
                                      COMPENSATE_SEQLEN, 0)
    del parent
    config = SearchConfig(budgets=sorted(args.budgets), population=args.population, generations=args.generations,
                          samples=args.samples, seqlen=args.seqlen)
    start = time.perf_counter()
    record = Search(args.model, work / "run", config, device="cpu").run()
    search_seconds = time.perf_counter() - start
    print(f"search: {search_seconds:.0f} s, {len(record['candidates'])} candidates", flush=True)
    for budget in args.budgets:
        for compensate in ("searched", "slimgpt"):
            start = time.perf_counter()
            folder = export_subnet(work / "run", work / f"{compensate}-{budget}", budget=budget, compensate=compensate,
                                   device="cpu")
            seconds = time.perf_counter() - start
            rows.append({"row": f"search ({compensate})", "budget": budget, **measure(compress.load(folder).model),
                         "seconds": round(seconds, 1)})
            print(json.dumps(rows[-1]), flush=True)
        model = load_model(source, tokenizer=False).model
        start = time.perf_counter()
        compress.prune(model, method="slimgpt", tokens=prune_tokens, device="cpu", ratio=round(1 - budget, 4),
                       schedule="log")
        rows.append({"row": "slimgpt-log", "budget": budget, **measure(model),
                     "seconds": round(time.perf_counter() - start, 1)})
        print(json.dumps(rows[-1]), flush=True)
    seeds = [c for c in record["candidates"] if c.get("seed") == "slimgpt-log"]
    lines = [f"\n## {datetime.date.today()} — `python -m evaluation.bench_search_obs --samples {args.samples} "
             f"--seqlen {args.seqlen} --windows {args.windows}`", "",
             f"Machine: {os.cpu_count()}-core CPU, no GPU, torch threads {torch.get_num_threads()}; load average at "
             f"the end {os.getloadavg()[0]:.1f}. Search: OBS candidates, KL on {args.samples} × {args.seqlen} "
             f"WikiText-2 train tokens (seed 0), profiling walk on {config.obs_samples} × {config.obs_seqlen}, "
             f"population {args.population}, {args.generations} generations, {len(record['candidates'])} "
             f"candidates, {search_seconds:.0f} s. SlimGPT and `--compensate slimgpt`: {COMPENSATE_SAMPLES} × "
             f"{COMPENSATE_SEQLEN} tokens of the same source and seed. Perplexity: WikiText-2 test at 2048, first "
             f"{args.windows} windows. Whole benchmark {time.perf_counter() - started:.0f} s.", "",
             "| row | budget | decoder params | ppl@2048 | seconds |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['row']} | {r['budget']:.2f} | {r['decoder_params'] / 1e6:.1f} M | {r['ppl']:.2f} | "
                     f"{r['seconds']} |")
    from compress.search.export import choose

    picked = [choose(record["front"], record["objectives"], None, b) for b in args.budgets]
    lines += ["", "Calibration KL (the search's objective, OBS-refit candidates): SlimGPT's log-schedule structure "
              "seeded at each budget " + ", ".join(f"{s['params']:.3f} → {s['kl']:.3f}" for s in seeds)
              + "; the front members exported " + ", ".join(f"{m['params']:.3f} → {m['kl']:.3f}" for m in picked)
              + "."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write(text)


if __name__ == "__main__":
    main()
