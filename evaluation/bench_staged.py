"""Benchmark: the staged walk against re-running each layer per group, for GPTQ and SlimGPT.

Protocol: smollm2-135m, ``--samples`` × ``--seqlen`` WikiText-2 train tokens (seed 0), batch 8,
torch threads ``--threads``. One plain forward of the full model over the tokens is timed first;
then, for every method, a fresh copy of the model is walked with ``staged=False`` (every group re-runs
the layer from its start, plus one propagation forward) and with ``staged=True`` (compress.staged),
in that order. Reported: both wall times, their ratio, each ÷ the plain forward, and how far the two
results are apart: the relative difference of the last layer's outputs and of the weights (GPTQ
codes may flip where a value sits on a rounding tie, so small differences are expected there).

    python evaluation/bench_staged.py --methods gptq,slimgpt --samples 32 --seqlen 512
"""

from __future__ import annotations

import argparse
import time

import torch

from compress.data import calibration_tokens
from compress.plugin import build_method
from compress.models import load_model
from compress.walk import walk
from evaluation.bench_quantize import plain_forward_seconds

OPTIONS = {"gptq": {"bits": 4, "group_size": 64, "act_order": True},
           "slimgpt": {"ratio": 0.2}}


def make_method(name, model):
    method = build_method(name, OPTIONS[name])
    method.prepare(model)
    return method


def run(name, tokens, staged):
    model = load_model("smollm2-135m").model
    method = make_method(name, model)
    start = time.perf_counter()
    result = walk(model, tokens, [method], batch_size=8, staged=staged, keep_hidden=True)
    return time.perf_counter() - start, torch.cat(result.hidden), model.state_dict()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="gptq,slimgpt")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dense = load_model("smollm2-135m")
    tokens = calibration_tokens(dense.model, dense.tokenizer, "wikitext2", args.samples, args.seqlen, seed=0)
    forward = plain_forward_seconds(dense.model, tokens, 8)
    del dense
    rows = []
    for name in [m for m in args.methods.split(",") if m]:
        plain_s, plain_out, plain_state = run(name, tokens, staged=False)
        staged_s, staged_out, staged_state = run(name, tokens, staged=True)
        mismatched = sum(v.shape != staged_state[k].shape for k, v in plain_state.items())
        if mismatched:
            raise SystemExit(f"{name}: the staged and plain walks left {mismatched} tensors of different shapes")
        out_rel = ((staged_out - plain_out).norm() / plain_out.norm()).item()
        w_rel = max(((staged_state[k].float() - v.float()).norm() / v.float().norm().clamp_min(1e-30)).item()
                    for k, v in plain_state.items() if v.is_floating_point())
        rows.append((name, plain_s, staged_s, out_rel, w_rel))
        print(f"{name}: plain {plain_s:.1f} s, staged {staged_s:.1f} s", flush=True)
    print(f"\nsmollm2-135m, {args.samples} × {args.seqlen} calibration tokens, batch 8, torch threads {args.threads}; "
          f"one plain forward over them: {forward:.1f} s")
    print("| method | plain walk s | staged walk s | speed-up | plain ÷ forward | staged ÷ forward | "
          "outputs rel. diff | max weight rel. diff |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, plain_s, staged_s, out_rel, w_rel in rows:
        print(f"| {name} {OPTIONS[name]} | {plain_s:.1f} | {staged_s:.1f} | {plain_s / staged_s:.2f} × | "
              f"{plain_s / forward:.2f} | {staged_s / forward:.2f} | {out_rel:.2e} | {w_rel:.2e} |")


if __name__ == "__main__":
    main()
