"""Benchmark: peak resident memory of whole ``compress`` commands on smollm2-135m, against a budget.

Protocol: each command runs in its own process (``python -m compress ...``) under ``/usr/bin/time``,
whose ``%M`` is the child's peak resident set size (ru_maxrss); ``%e`` is its wall time. The same
commands run on two trees, one after the other: ``--before DIR`` (an older copy of the repository, put
first on PYTHONPATH; e.g. ``git archive HEAD | tar -x -C DIR``) and this tree. The budget (goal of
issue 18) is 2.5 GB (2.5e9 bytes) per command. Small sizes keep each command within minutes; the
peaks that matter (two models, the logits of one 2048-token window, the walk's activations) do not
shrink with them:

* ``eval``: ``eval smollm2-135m --data wikitext2 --seqlen 2048 --windows 1 --reference smollm2-135m``
* ``quantize``: GPTQ W4 g64 sym act-order, wikitext2 calibration 16 × 256
* ``prune``: SlimGPT 20 % log schedule, wikitext2 calibration 16 × 256
* ``run``: ``recipes/smollm2-135m-slimgpt20-gptq-w4g64.yaml`` with calibration 16 × 256 and its
  evaluation cut to one 2048-token window (perplexity and fidelity)

    python -m evaluation.bench_memory --before /tmp/before --out evaluation/results/memory-smollm2.md
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
BUDGET = 2.5e9
RECIPE = REPO / "recipes" / "smollm2-135m-slimgpt20-gptq-w4g64.yaml"
CALIBRATION = ["--data", "wikitext2", "--samples", "16", "--seqlen", "256"]


def commands(work: Path) -> dict[str, list[str]]:
    recipe = yaml.safe_load(RECIPE.read_text())
    recipe["data"].update(samples=16, seqlen=256)
    recipe["eval"] = {"perplexity": {"data": "wikitext2", "seqlen": 2048, "windows": 1},
                      "fidelity": {"reference": "smollm2-135m", "seqlen": 2048, "windows": 1}}
    small = work / "stacking-small.yaml"
    small.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return {
        "eval --reference": ["eval", "smollm2-135m", "--data", "wikitext2", "--seqlen", "2048", "--windows", "1",
                             "--reference", "smollm2-135m", "--json"],
        "quantize": ["quantize", "smollm2-135m", "--method", "gptq", "--bits", "4", "--group-size", "64", "--sym",
                     "--act-order", *CALIBRATION, "--out", str(work / "gptq"), "--force"],
        "prune": ["prune", "smollm2-135m", "--method", "slimgpt", "--ratio", "0.2", "--schedule", "log",
                  *CALIBRATION, "--out", str(work / "slim"), "--force"],
        "run (stacking recipe)": ["run", str(small), "--out", str(work / "stacked"), "--force"],
    }


def measure(tree: Path, argv: list[str], work: Path) -> dict:
    """Peak RSS (bytes) and wall seconds of ``python -m compress ARGV`` with ``tree`` first on the path."""
    env = {**os.environ, "PYTHONPATH": str(tree), "COMPRESS_DATA": str(REPO.parent / "shared" / "data"),
           "COMPRESS_PROGRESS": "0"}
    stats = work / "time.txt"
    done = subprocess.run(["/usr/bin/time", "-f", "%M %e", "-o", str(stats), sys.executable, "-m", "compress",
                           "--quiet", *argv], cwd=work, env=env, capture_output=True, text=True)
    kib, seconds = stats.read_text().split()[-2:]
    error = done.stderr.strip().splitlines()[-1] if done.returncode else ""
    return {"rss": int(kib) * 1024, "seconds": float(seconds), "rc": done.returncode, "error": error}


def which_compress(tree: Path) -> str:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    return subprocess.run([sys.executable, "-c", "import compress; print(compress.__file__)"], env=env,
                          capture_output=True, text=True, cwd=tempfile.gettempdir()).stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", type=Path, help="an older tree of the repository (PYTHONPATH)")
    parser.add_argument("--only", nargs="*", help="command names to run (default: all)")
    parser.add_argument("--out", type=Path, help="write the markdown table here")
    args = parser.parse_args()
    trees = ([("before", args.before)] if args.before else []) + [("after", REPO)]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        work = Path(tmp)
        for label, tree in trees:
            print(f"{label}: {which_compress(tree)}", flush=True)
            for name, argv in commands(work).items():
                if args.only and name not in args.only:
                    continue
                result = measure(tree, argv, work)
                rows.append({"tree": label, "command": name, **result})
                print(f"{label:6s} {name:22s} peak {result['rss'] / 1e9:.2f} GB  {result['seconds']:.0f} s  "
                      f"rc {result['rc']} {result['error']}", flush=True)
    lines = [f"# Peak memory of compress commands, smollm2-135m ({datetime.date.today()})", "",
             f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; "
             "one process per command under /usr/bin/time (%M: the child's peak RSS; %e: wall time). "
             f"Budget: {BUDGET / 1e9:.1f} GB per command. Protocol and sizes: evaluation/bench_memory.py.", "",
             "| command | tree | peak RSS (GB) | within budget | wall (s) | exit |", "|---|---|---:|---|---:|---:|"]
    for row in sorted(rows, key=lambda r: (r["command"], r["tree"] != "before")):
        lines.append(f"| {row['command']} | {row['tree']} | {row['rss'] / 1e9:.2f} | "
                     f"{'yes' if row['rss'] <= BUDGET else 'NO'} | {row['seconds']:.0f} | {row['rc']} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
