"""Benchmark: SlimGPT against structured-pruning baselines on smollm2-135m (CPU-friendly protocol).

For each ratio of decoder parameters removed, every method prunes a fresh copy of the model on the
SAME calibration tokens (``--samples`` windows of ``--calib-seqlen`` tokens from the WikiText-2 train
excerpt, seed 0) to the SAME per-layer head/channel counts where the schedule is uniform:

    dense · magnitude · wanda-sp · slimgpt-uniform · slimgpt-log

and is measured on WikiText-2 test: perplexity at seqlen 128 (SlimGPT's protocol) over the first
``--windows-128`` non-overlapping windows and at 2048 over the first ``--windows-2048``; prefill
tokens/s (512-token prompt, best of 2) against the dense model; pruning wall time and its ratio to one
plain forward of the dense model over the calibration tokens.

    python -m evaluation.bench_prune --ratios 0.2 0.5 --out evaluation/results/prune-smollm2.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import time
from pathlib import Path

import torch

from compress.data import calibration_tokens, evaluation_stream
import compress
from compress.plugin import build_method
from compress.metrics.cost import count_parameters, tokens_per_second
from compress.metrics.perplexity import perplexity
from compress.models import decoder_layers, load_model
from compress.plugin import LayerContext
from compress.walk import walk
from evaluation.prune_baselines import StructuredBaseline

# row name → (registered method, its options besides ratio/gqa_unit); magnitude and wanda-sp are the
# baselines of evaluation.prune_baselines on SlimGPT's uniform plan
VARIANTS = {
    "slimgpt-uniform": ("slimgpt", {"schedule": "uniform"}),
    "slimgpt-log": ("slimgpt", {"schedule": "log"}),
    "slimgpt-log-bias": ("slimgpt", {"schedule": "log", "bias": True}),
    "slimgpt-global": ("slimgpt", {"schedule": "global", "bias": True}),
    "flap": ("flap", {}),
    "flap-uniform": ("flap", {"structure": "uniform"}),
    "shortgpt": ("shortgpt", {}),
}
METHODS = ["dense", "magnitude", "wanda-sp", *VARIANTS]


@torch.no_grad()
def plain_forward_seconds(model, tokens: torch.Tensor, batch_size: int) -> float:
    start = time.perf_counter()
    for b in range(0, tokens.shape[0], batch_size):
        model(input_ids=tokens[b:b + batch_size], use_cache=False)
    return time.perf_counter() - start


def run_method(name: str, ratio: float, tokens: torch.Tensor, args) -> tuple[torch.nn.Module, float]:
    """Prune a fresh model with ``name``; return it and the pruning wall time."""
    model = load_model(args.model, tokenizer=False).model
    if name == "dense":
        return model, 0.0
    start = time.perf_counter()
    if name in VARIANTS:
        method, extra = VARIANTS[name]
        options = {"ratio": ratio, **extra, **({} if method == "shortgpt" else {"gqa_unit": args.gqa_unit})}
        compress.prune(model, method=method, tokens=tokens, device="cpu", batch_size=args.batch_size, **options)
        return model, time.perf_counter() - start
    options = {"ratio": ratio, "schedule": "uniform", "gqa_unit": args.gqa_unit}
    planner = build_method("slimgpt", options)
    planner.prepare(model)
    method = StructuredBaseline(name, planner)
    if name == "magnitude":  # data-free: no walk needed
        for index, layer in enumerate(decoder_layers(model)):
            for group in method.groups(layer, index):
                method.apply(LayerContext(layer, index, group, {}, torch.device("cpu")))
    else:
        walk(model, tokens, [method], device="cpu", batch_size=args.batch_size)
    return model, time.perf_counter() - start


def measure(model, stream, args) -> dict:
    decoder = sum(p.numel() for p in decoder_layers(model).parameters())
    ppl128 = perplexity(model, stream, 128, None, args.windows_128, batch_size=16).perplexity
    ppl2048 = perplexity(model, stream, 2048, None, args.windows_2048).perplexity if args.windows_2048 else float("nan")
    prefill, _ = tokens_per_second(model, prefill_len=512, decode_steps=4, repeats=2)
    return {"params": count_parameters(model), "decoder_params": decoder, "ppl128": ppl128, "ppl2048": ppl2048,
            "prefill_tok_s": prefill}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.5])
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--calib-seqlen", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--windows-128", type=int, default=80)
    parser.add_argument("--windows-2048", type=int, default=5)
    parser.add_argument("--gqa-unit", default="query", choices=["query", "kv"])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core CPU)")
    parser.add_argument("--json", default=None, help="Write the rows as JSON here.")
    parser.add_argument("--out", default=None, help="Write the markdown table here.")
    parser.add_argument("--merge", nargs="+", default=None, help="Only render the rows of these --json files.")
    args = parser.parse_args()
    if args.merge:
        return merge(args)
    torch.set_num_threads(args.threads)

    dense = load_model(args.model)
    tokens = calibration_tokens(dense.model, dense.tokenizer, "wikitext2", args.samples, args.calib_seqlen, seed=0)
    stream = evaluation_stream(dense.tokenizer, "wikitext2")
    forward_s = plain_forward_seconds(dense.model, tokens, args.batch_size)
    dense_decoder = sum(p.numel() for p in decoder_layers(dense.model).parameters())
    dense_row = None
    rows = []
    for ratio in args.ratios:
        for name in args.methods:
            if name == "dense" and dense_row is not None:
                continue
            model, seconds = run_method(name, ratio, tokens, args)
            row = {"method": name, "ratio": 0.0 if name == "dense" else ratio, "prune_s": seconds,
                   "prune_vs_forward": seconds / forward_s, **measure(model, stream, args)}
            if name == "dense":
                dense_row = row
            rows.append(row)
            print(json.dumps(row), flush=True)
    for row in rows:
        row["removed"] = 1 - row["decoder_params"] / dense_decoder
        row["prefill_vs_dense"] = row["prefill_tok_s"] / dense_row["prefill_tok_s"] if dense_row else float("nan")
    table = render(rows, args, forward_s, tokens.shape)
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "forward_s": forward_s, "args": vars(args)}, indent=1))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(table + "\n")


def merge(args) -> None:
    """Render one table from several runs (e.g. one process per ratio) that share a protocol."""
    parts = [json.loads(Path(p).read_text()) for p in args.merge]
    rows = []
    for part in parts:  # each run's speeds against the dense model measured in that same run
        dense = next(row for row in part["rows"] if row["method"] == "dense")
        for row in part["rows"]:
            row["prefill_vs_dense"] = row["prefill_tok_s"] / dense["prefill_tok_s"]
            if row["method"] != "dense" or not any(r["method"] == "dense" for r in rows):
                rows.append(row)
    first = argparse.Namespace(**parts[0]["args"])
    shape = (first.samples, first.calib_seqlen)
    table = render(rows, first, parts[0]["forward_s"], shape)
    print(table)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(table + "\n")


def render(rows: list[dict], args, forward_s: float, shape) -> str:
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"# Structured pruning of {args.model}: SlimGPT vs baselines ({date})", "",
             f"Calibration: {shape[0]} × {shape[1]} tokens of the WikiText-2 train excerpt (seed 0), the same for "
             f"every method. Perplexity: WikiText-2 test, non-overlapping windows, first {args.windows_128} windows "
             f"at 128 tokens and first {args.windows_2048} at 2048. GQA unit: {args.gqa_unit}. Prefill: 512 tokens, "
             f"batch 1, best of 2. One plain forward over the calibration tokens: {forward_s:.1f} s. "
             f"torch threads: {args.threads}.", "",
             "**Caveat:** measured on a 2-core CPU shared with other engineers' jobs; times and tokens/s are noisy.", "",
             "| method | target | decoder removed | params | ppl@128 | ppl@2048 | prune time (s) | × forward | "
             "prefill tok/s | × dense |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['ratio']:.0%} | {r['removed']:.2%} | {r['params'] / 1e6:.2f}M | "
                     f"{_num(r['ppl128'])} | {_num(r['ppl2048'])} | {r['prune_s']:.1f} | {r['prune_vs_forward']:.1f} | "
                     f"{r['prefill_tok_s']:.0f} | {r['prefill_vs_dense']:.2f} |")
    return "\n".join(lines)


def _num(x: float) -> str:
    return f"{x:.2f}" if math.isfinite(x) and x < 1e5 else f"{x:.3g}"


if __name__ == "__main__":
    main()
