"""Benchmark: the search's latency objective, predicted per block against whole-model timings.

``compress search --objectives kl,latency`` sums a per-block table measured once (every attention and
FFN option timed on one layer at the calibration length, plus the embedding / final norm / lm_head).
This run searches with that objective, exports ``--members`` front members (plain slices), and times
each exported model's whole prefill of one ``--seqlen``-token sequence (batch 1, median of ``--reps``
after a warm-up), against the table's prediction, in one process on one machine.

    python -m evaluation.bench_search_latency --out evaluation/results/search-smollm2.md
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import statistics
import time
from pathlib import Path

import torch

import compress
from compress.search.export import export_subnet
from evaluation.bench_search import emit
from compress.search.run import Search, SearchConfig


@torch.no_grad()
def prefill_seconds(model, seqlen: int, reps: int) -> float:
    ids = torch.randint(0, model.config.vocab_size, (1, seqlen), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, use_cache=False)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        model(input_ids=ids, use_cache=False)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--budgets", default="0.5,0.7,0.85")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--population", type=int, default=8)
    ap.add_argument("--generations", type=int, default=2)
    ap.add_argument("--members", type=int, default=6)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--work", default="/tmp/bench_search_latency")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    config = SearchConfig(objectives=["kl", "latency"], budgets=[float(b) for b in args.budgets.split(",")],
                          population=args.population, generations=args.generations, samples=args.samples,
                          seqlen=args.seqlen)
    start = time.perf_counter()
    record = Search(args.model, work / "run", config, device="cpu").run()
    search_seconds = time.perf_counter() - start
    parent = compress.load(args.model).model.eval()
    parent_seconds = prefill_seconds(parent, args.seqlen, args.reps)
    del parent
    front = record["front"]
    picks = sorted({round(i * (len(front) - 1) / max(args.members - 1, 1)) for i in range(args.members)})
    rows = []
    for k in picks:
        folder = export_subnet(work / "run", work / f"m{k}", pick=k, device="cpu")
        model = compress.load(folder).model.eval()
        measured = prefill_seconds(model, args.seqlen, args.reps)
        rows.append((k, front[k]["params"], front[k]["latency_seconds"], measured, front[k]["latency"],
                     measured / parent_seconds))
        shutil.rmtree(folder)
    table = record.get("parent", {})
    lines = [f"\n## {datetime.date.today()} — `python -m evaluation.bench_search_latency` (latency objective)\n",
             f"Machine: 2-core CPU; load average at the end {os.getloadavg()[0]:.1f}. Search `--objectives "
             f"kl,latency`, population {args.population}, {args.generations} generations, {args.samples} × "
             f"{args.seqlen} tokens, {search_seconds:.0f} s. Prefill of one {args.seqlen}-token sequence, median of "
             f"{args.reps}; parent {parent_seconds * 1e3:.1f} ms measured, "
             f"{table.get('latency_seconds', float('nan')) * 1e3:.1f} ms predicted by the table.\n",
             "| pick | params | predicted ms | measured ms | predicted ÷ parent | measured ÷ parent |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {k} | {p:.3f} | {pred * 1e3:.1f} | {meas * 1e3:.1f} | {pf:.3f} | {mf:.3f} |"
              for k, p, pred, meas, pf, mf in rows]
    errors = [abs(pf - mf) / mf for _, _, _, _, pf, mf in rows]
    lines.append(f"\nRelative error of the predicted fraction of the parent's time: mean {statistics.mean(errors):.1%}, "
                 f"max {max(errors):.1%}.")
    emit(lines, args.out)


if __name__ == "__main__":
    main()
