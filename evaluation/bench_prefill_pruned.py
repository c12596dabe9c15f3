"""Benchmark: prefill and decode speed of SlimGPT-pruned shapes against the dense model.

Speed depends on the shapes only, not on the weight values, so this builds, for every ratio and GQA
unit, the exact per-layer widths SlimGPT's planner gives (``SlimGPT.prepare``: the schedule's ratios
turned into heads, KV heads and FFN channels) by resizing the dense model's layers, without
calibration. The models are measured in interleaved rounds (dense, pruned A, pruned B, dense, ...) so
that a CPU shared with other jobs slows all of them alike; the table gives the median over rounds of
each round's best-of-``--repeats`` tokens/s, and its ratio to the dense model.

    python -m evaluation.bench_prefill_pruned --out evaluation/results/prefill-pruned-smollm2.md
"""

from __future__ import annotations

import argparse
import copy
import datetime
import statistics
from pathlib import Path

import torch

from compress.plugin import build_method
from compress.metrics.cost import count_parameters, kv_cache_bytes_per_token, tokens_per_second
from compress.modeling_pruned import resize_layer
from compress.models import load_model


def pruned_shape_model(dense: torch.nn.Module, ratio: float, schedule: str, unit: str) -> torch.nn.Module:
    planner = build_method("slimgpt", {"ratio": ratio, "schedule": schedule, "gqa_unit": unit})
    plans = planner.prepare(dense)
    model = copy.deepcopy(dense)
    for layer, plan, shape in zip(model.model.layers, plans, planner.shapes):
        resize_layer(layer, shape.heads - plan.heads_removed, shape.kv_heads - plan.kv_removed,
                     shape.ffn - plan.channels_removed, shape.head_dim)
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.5])
    parser.add_argument("--units", nargs="+", default=["query", "kv"], choices=["query", "kv"])
    parser.add_argument("--schedule", default="log")
    parser.add_argument("--prefill", type=int, default=512)
    parser.add_argument("--decode", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    dense = load_model(args.model, tokenizer=False).model.eval()
    models = {"dense": dense}
    for ratio in args.ratios:
        for unit in args.units:
            models[f"slimgpt-{args.schedule} {ratio:.0%} unit={unit}"] = pruned_shape_model(dense, ratio, args.schedule, unit)
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in models}
    with torch.no_grad():
        for _ in range(args.rounds):
            for name, model in models.items():
                runs[name].append(tokens_per_second(model, args.prefill, args.decode, repeats=args.repeats))
    base = {k: statistics.median(r[k] for r in runs["dense"]) for k in (0, 1)}
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"# Prefill/decode speed of SlimGPT-pruned shapes: {args.model} ({date})", "",
             f"CPU, torch {torch.__version__}, {args.threads} thread(s); prompt {args.prefill} random tokens, batch 1, "
             f"then {args.decode} greedy decode steps with the KV cache; {args.rounds} interleaved rounds, "
             f"best of {args.repeats} per round, median over rounds. The CPU is shared with other jobs.", "",
             "| model | params | KV bytes/token | prefill tok/s | × dense | decode tok/s | × dense |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, model in models.items():
        prefill = statistics.median(r[0] for r in runs[name])
        decode = statistics.median(r[1] for r in runs[name])
        lines.append(f"| {name} | {count_parameters(model) / 1e6:.1f}M | {kv_cache_bytes_per_token(model)} | "
                     f"{prefill:.0f} | {prefill / base[0]:.2f} | {decode:.1f} | {decode / base[1]:.2f} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(table + "\n")


if __name__ == "__main__":
    main()
