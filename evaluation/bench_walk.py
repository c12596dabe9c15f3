"""Benchmark: the cost of the layer walk itself, against a plain forward over the same tokens.

Protocol (one process, one model, the same calibration tokens for every row):

* calibration: ``--samples`` windows of ``--seqlen`` tokens from the WikiText-2 train excerpt, seed 0
  (the walk does not look at where the tokens came from);
* ``forward (full model)``: ``model(input_ids=batch, use_cache=False)`` over every batch, logits
  included; ``forward (decoder only)``: ``model.model(...)``, the same work as the walk minus lm_head;
* ``empty walk``: ``compress.walk.walk(model, tokens, [])`` — capture layer-0 inputs, then each layer
  onloaded, propagated over every cached batch and offloaded, the activations kept on the host;
* each timing is the best of ``--repeats`` runs, same ``--batch-size``, same torch thread count;
* peak host memory: resident set size sampled every 5 ms by a thread (psutil) during each phase,
  against the walk's documented formula: host ≈ model bytes + N·L·H·4.

    python -m evaluation.bench_walk --out evaluation/results/walk-smollm2.md
"""

from __future__ import annotations

import argparse
import datetime
import gc
import platform
import threading
import time
from pathlib import Path

import psutil
import torch

from compress.data import calibration_tokens
from compress.models import load_model
from compress.progress import set_progress
from compress.walk import walk, walk_memory_formula

MiB = 1024 ** 2


class PeakRSS:
    """Sample this process's resident set size in a background thread; keep the maximum."""

    def __init__(self, interval: float = 0.005):
        self.interval, self.process = interval, psutil.Process()
        self.start_rss = self.peak = 0
        self._stop = threading.Event()

    def __enter__(self):
        gc.collect()
        self.start_rss = self.peak = self.process.memory_info().rss
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


@torch.no_grad()
def forward(module, tokens: torch.Tensor, batch_size: int) -> None:
    for start in range(0, tokens.shape[0], batch_size):
        module(input_ids=tokens[start:start + batch_size], use_cache=False)


def best_of(repeats: int, fn) -> tuple[float, PeakRSS]:
    best, memory = float("inf"), None
    for _ in range(repeats):
        with PeakRSS() as rss:
            start = time.perf_counter()
            fn()
            seconds = time.perf_counter() - start
        best, memory = min(best, seconds), rss if memory is None or rss.peak > memory.peak else memory
    return best, memory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--out", default=None, help="Also write the markdown table here.")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    set_progress(False)

    loaded = load_model(args.model)
    model = loaded.model.eval()
    tokens = calibration_tokens(model, loaded.tokenizer, "wikitext2", args.samples, args.seqlen, seed=0)
    formula = walk_memory_formula(model, args.samples, args.seqlen)

    # Warm-up (allocator, kernels), not timed.
    forward(model, tokens[: args.batch_size], args.batch_size)

    full_s, full_mem = best_of(args.repeats, lambda: forward(model, tokens, args.batch_size))
    dec_s, dec_mem = best_of(args.repeats, lambda: forward(model.model, tokens, args.batch_size))
    walk_s, walk_mem = best_of(args.repeats, lambda: walk(model, tokens, [], device="cpu", batch_size=args.batch_size))

    n_tokens = tokens.numel()
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"# The empty walk against a plain forward: {args.model} ({date})", "",
        f"Machine: {platform.machine()}, {psutil.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, device cpu. Calibration: {args.samples} × {args.seqlen} = {n_tokens} "
        f"tokens of the WikiText-2 train excerpt (seed 0), batch {args.batch_size}, best of {args.repeats}.", "",
        "| pass | seconds | tokens/s | ratio to full forward | ratio to decoder-only forward | peak RSS (MiB) | growth over start (MiB) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, seconds, mem in (("forward (full model)", full_s, full_mem),
                               ("forward (decoder only)", dec_s, dec_mem),
                               ("empty walk", walk_s, walk_mem)):
        lines.append(f"| {name} | {seconds:.2f} | {n_tokens / seconds:.0f} | {seconds / full_s:.3f} | "
                     f"{seconds / dec_s:.3f} | {mem.peak / MiB:.0f} | {(mem.peak - mem.start_rss) / MiB:.0f} |")
    growth = walk_mem.peak - walk_mem.start_rss
    lines += [
        "",
        f"Walk / full forward = **{walk_s / full_s:.3f}** (goal ≤ 1.1); walk / decoder-only forward = "
        f"**{walk_s / dec_s:.3f}**.", "",
        "Host memory against the formula (host ≈ model bytes + N·L·H·4):", "",
        "| quantity | MiB |", "|---|---:|",
        f"| model bytes (formula) | {formula['model_bytes'] / MiB:.1f} |",
        f"| activations N·L·H·4 (formula) | {formula['activation_bytes'] / MiB:.1f} |",
        f"| formula total | {formula['host_bytes'] / MiB:.1f} |",
        f"| process RSS before the walk (python + torch + model + tokens) | {walk_mem.start_rss / MiB:.0f} |",
        f"| peak RSS during the walk | {walk_mem.peak / MiB:.0f} |",
        f"| growth during the walk (activations + one batch's intermediates) | {growth / MiB:.0f} |",
        "",
        f"Growth / formula activations = {growth / formula['activation_bytes']:.2f}. The growth above the "
        "activation cache is one batch's transient intermediates (attention, FFN) and allocator slack, the "
        "same kind of transient memory a plain forward needs (its growth is in the table above).",
    ]
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(table + "\n")


if __name__ == "__main__":
    main()
