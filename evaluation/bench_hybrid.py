"""Decode speed and memory of Zebra-Llama hybrids of smollm2-135m against the parent, on this CPU.

Rows: the parent (30 attention layers), an all-MLA hybrid (30 MLA layers) and a 4-MLA / 26-Mamba2
hybrid (MLA at layers 0, 10, 20, 28), all untrained initialisations (this measures the machinery, not
quality), default ranks r_q 384, r_kv 128, d_rope 32, float32.

Protocol, per (model, context) in a fresh process: random tokens (seed 0) of ``context`` length are
prefilled with the cache (``logits_to_keep=1``), then ``--steps`` greedy tokens are decoded one at a
time after 2 untimed warm-up steps; decode tokens/s = steps / wall time. Peak memory is the process's
peak RSS (weights, prefill activations and cache included) and the cache's own bytes after the
prefill. KV bytes per token and SSM state bytes come from :mod:`compress.metrics.cost`.

    .venv/bin/python -m evaluation.bench_hybrid --out evaluation/results/hybrid-smollm2.md
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

MODELS = {"parent": None, "all-MLA": (list(range(30)), []), "4-MLA/26-Mamba2": ([0, 10, 20, 28], "rest")}
MARK = Path("/tmp/bench.running")


def build(name: str):
    import compress
    from compress.hybrid.build import hybridize

    parent = compress.load("smollm2-135m")
    if MODELS[name] is None:
        return parent.model
    mla, mamba = MODELS[name]
    model = hybridize(parent.model, mla_layers=mla, mamba_layers=mamba)
    del parent
    return model


def cache_bytes(cache) -> int:
    if hasattr(cache, "bytes_per_layer"):
        return sum(cache.bytes_per_layer())
    total = 0
    for layer in cache.layers:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


@torch.no_grad()
def one(name: str, context: int, steps: int, threads: int) -> dict:
    from compress.metrics.cost import is_hybrid, kv_cache_bytes_per_token, kv_cache_fraction, ssm_state_bytes

    torch.set_num_threads(threads)
    model = build(name).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, context), generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    prefill_s = time.perf_counter() - t0
    cache, nxt = out.cache, out.logits[:, -1:].argmax(-1)
    held = cache_bytes(cache)
    for i in range(steps + 2):
        if i == 2:
            t1 = time.perf_counter()
        out = model(input_ids=nxt, cache=cache, use_cache=True)
        cache, nxt = out.cache, out.logits[:, -1:].argmax(-1)
    decode_s = time.perf_counter() - t1
    return {"model": name, "context": context, "prefill_s": round(prefill_s, 2),
            "decode_tokens_per_s": round(steps / decode_s, 2), "peak_rss_mib": resource.getrusage(
                resource.RUSAGE_SELF).ru_maxrss // 1024, "cache_mib": round(held / 2 ** 20, 2),
            "kv_bytes_per_token": kv_cache_bytes_per_token(model),
            "kv_fraction": kv_cache_fraction(model) if is_hybrid(model) else 1.0,
            "ssm_state_bytes": ssm_state_bytes(model) if is_hybrid(model) else 0}


def table(rows: list[dict], contexts: list[int]) -> list[str]:
    lines = ["| model | KV bytes/token | KV % of parent | SSM state bytes | "
             + " | ".join(f"decode tok/s @{c}" for c in contexts) + " | "
             + " | ".join(f"peak RSS MiB (cache MiB) @{c}" for c in contexts) + " | "
             + " | ".join(f"prefill s @{c}" for c in contexts) + " |",
             "|---" * (4 + 3 * len(contexts)) + "|"]
    for name in MODELS:
        mine = {r["context"]: r for r in rows if r["model"] == name}
        if not mine:
            continue
        first = next(iter(mine.values()))
        cells = [name, str(first["kv_bytes_per_token"]), f"{100 * first['kv_fraction']:.2f}%",
                 str(first["ssm_state_bytes"])]
        cells += [str(mine[c]["decode_tokens_per_s"]) if c in mine else "-" for c in contexts]
        cells += [f"{mine[c]['peak_rss_mib']} ({mine[c]['cache_mib']})" if c in mine else "-" for c in contexts]
        cells += [str(mine[c]["prefill_s"]) if c in mine else "-" for c in contexts]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "CONTEXT"), help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one[0], int(args.one[1]), args.steps, args.threads)))
        return
    rows, started = [], time.time()
    for context in args.contexts:
        for name in args.models:
            proc = subprocess.run([sys.executable, "-m", "evaluation.bench_hybrid", "--one", name, str(context),
                                   "--steps", str(args.steps), "--threads", str(args.threads)],
                                  capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
            if proc.returncode:
                raise SystemExit(proc.stderr[-3000:])
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    lines = table(rows, args.contexts)
    print("\n".join(lines))
    print(f"wall {time.time() - started:.0f} s")
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    os.environ.setdefault("COMPRESS_PROGRESS", "0")
    main()
