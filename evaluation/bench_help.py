"""Benchmark: wall time of ``compress --help`` and ``compress VERB --help`` against the 1.5 s goal.

Protocol: each help page runs in a fresh process (``python -m compress ... --help``), stdout to a
pipe; the time is the median of ``--repeats`` runs (default 3). A verb's first help after a change of
the sources or plugins imports every method to list their flags and stores them in the help cache
(:mod:`compress.cli.help_cache`); later ones read them. Both are measured: ``cold`` with an empty
``COMPRESS_CACHE`` before every run, ``warm`` with the cache filled by one run before.

    python -m evaluation.bench_help --before /tmp/before --out evaluation/results/help-smollm2.md
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GOAL = 1.5
VERBS = ["", "adapt", "eval", "prune", "quantize", "run", "transfer"]


def one(verb: str, cache: Path, tree: Path | None = None) -> float:
    env = {**os.environ, "COMPRESS_CACHE": str(cache), **({"PYTHONPATH": str(tree)} if tree else {})}
    argv = [sys.executable, "-m", "compress", *([verb] if verb else []), "--help"]
    start = time.perf_counter()
    done = subprocess.run(argv, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"{' '.join(argv)} failed: {done.stderr.strip()[-300:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--before", type=Path, help="an older tree of the repository (PYTHONPATH), measured too")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-help-") as tmp:
        for verb in VERBS:
            cold = []
            for n in range(args.repeats):
                cache = Path(tmp) / f"cold-{verb}-{n}"  # empty every time
                cold.append(one(verb, cache))
            warm_cache = Path(tmp) / "warm"
            one(verb, warm_cache)  # fills it
            warm = [one(verb, warm_cache) for _ in range(args.repeats)]
            old = [one(verb, Path(tmp) / "before", args.before) for _ in range(args.repeats)] if args.before else []
            rows.append((f"compress {verb} --help".replace("  ", " "), statistics.median(old) if old else None,
                         statistics.median(cold), statistics.median(warm)))
            print(f"{rows[-1][0]:28s} before {rows[-1][1] or 0:.2f} s  cold {rows[-1][2]:.2f} s  "
                  f"warm {rows[-1][3]:.2f} s", flush=True)
    lines = [f"# `--help` wall time ({datetime.date.today()})", "",
             f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}. "
             f"Fresh process per run, median of {args.repeats}; goal {GOAL} s. cold: empty help cache "
             "(the verb imports its methods); warm: the cache filled by an earlier help of the same sources. "
             f"before: the tree {args.before} (PYTHONPATH). Protocol: evaluation/bench_help.py.", "",
             "| command | before (s) | cold (s) | warm (s) | warm within goal |", "|---|---:|---:|---:|---|"]
    for name, old, cold, warm in rows:
        before = "–" if old is None else f"{old:.2f}"
        lines.append(f"| `{name}` | {before} | {cold:.2f} | {warm:.2f} | {'yes' if warm <= GOAL else 'NO'} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
