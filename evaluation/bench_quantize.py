"""Benchmark: RTN and GPTQ on smollm2-135m at 2/3/4 bits (group 64) and 8 bits per channel.

For every configuration: WikiText-2 perplexity at seqlen 2048 over the first ``--windows`` windows,
KL(float ‖ quantized) and top-1 agreement on the first ``--kl-windows`` of them, size on disk of the
compressed-tensors checkpoint, and the quantization wall time with its ratio to one plain forward of
the full model over the same calibration tokens. A peer checkpoint (llm-compressor's GPTQModifier,
made by evaluation/peers/llmcompressor_gptq.py in its own venv) is scored the same way.

    python evaluation/bench_quantize.py --configs gptq:4:64,rtn:4:64 --peer DIR --peer-log LOG

Peers in the same run: ``--peer-python PY`` runs evaluation/peers/llmcompressor_gptq.py with that
interpreter (its own venv: evaluation/peers/install_llmcompressor.sh) on the very calibration tokens
of this run, and ``--gptqmodel-python PY`` does the same with evaluation/peers/gptqmodel_gptq.py;
their times are their own quantization calls (load and save excluded), their checkpoints are scored
here like ours. ``--threads`` sets the torch threads of every process (peers included).

Results are appended as JSON lines to ``--jsonl`` as they come, and the table is printed at the end.
Wall times are only comparable between rows of one run on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from compress.data import calibration_tokens, evaluation_stream
from compress.plugin import build_method
from compress.methods.quantize.export import save_compressed_tensors
from compress.metrics.cost import bytes_on_disk
from compress.models import load_model, resolve_model_path
from compress.walk import walk


@torch.no_grad()
def reference_logprobs(model, stream, seqlen, windows):
    """Float model log-probabilities of the first windows (float16 to hold them in memory)."""
    return [F.log_softmax(model(stream[i * seqlen:(i + 1) * seqlen][None], use_cache=False).logits[0].float(), -1).half()
            for i in range(windows)]


@torch.no_grad()
def score(model, stream, seqlen, windows, reference):
    """Perplexity (mean of window losses, non-overlapping windows), mean KL and top-1 agreement."""
    losses, kl_sum, agree, positions = [], 0.0, 0, 0
    for i in range(windows):
        ids = stream[i * seqlen:(i + 1) * seqlen][None]  # (1, L)
        logits = model(ids, use_cache=False).logits[0].float()  # (L, V)
        losses.append(F.cross_entropy(logits[:-1], ids[0, 1:]).double().item())
        if i < len(reference):
            logp = F.log_softmax(logits, -1)
            ref = reference[i].float()
            kl_sum += (ref.exp() * (ref - logp)).sum().item()
            agree += (logp.argmax(-1) == ref.argmax(-1)).sum().item()
            positions += ids.shape[1]
    return {"ppl": math.exp(sum(losses) / len(losses)), "kl": kl_sum / max(positions, 1),
            "top1": agree / max(positions, 1)}


@torch.no_grad()
def plain_forward_seconds(model, tokens, batch_size):
    start = time.perf_counter()
    for b in range(0, tokens.shape[0], batch_size):
        model(tokens[b:b + batch_size], use_cache=False)
    return time.perf_counter() - start


def quantize(method, bits, group, tokens, batch_size, extra):
    """Quantize a fresh copy of the model; the time is the walk's (no load, no save)."""
    loaded = load_model("smollm2-135m")
    options = {"bits": bits, "group_size": group, "sym": True, **extra}
    quant = build_method(method, options)
    calib = tokens if method == "gptq" else torch.zeros(1, 8, dtype=torch.long)  # RTN is data-free
    start = time.perf_counter()
    walk(loaded.model, calib, [quant], batch_size=batch_size)
    return loaded, time.perf_counter() - start


def disk_size(loaded):
    tmp = Path(tempfile.mkdtemp())
    try:
        out = save_compressed_tensors(loaded.model, None, tmp / "q", {"bench": True})
        return bytes_on_disk(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="rtn:2:64,gptq:2:64,rtn:3:64,gptq:3:64,rtn:4:64,gptq:4:64,rtn:8:-1,gptq:8:-1")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--kl-windows", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--act-order", action="store_true")
    parser.add_argument("--no-clip-search", action="store_true")
    parser.add_argument("--no-sequential", action="store_true")
    parser.add_argument("--peer", default=None, help="a peer's compressed-tensors checkpoint folder")
    parser.add_argument("--peer-log", default=None, help="the peer run's log, whose last JSON line has its seconds")
    parser.add_argument("--peer-python", default=None, help="python of the llm-compressor venv: run it here")
    parser.add_argument("--gptqmodel-python", default=None, help="python of the GPTQModel venv: run it here")
    parser.add_argument("--peer-group-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch CPU threads of this process and of the peers (default: all cores)")
    parser.add_argument("--jsonl", default="evaluation/results/quantize-smollm2.jsonl")
    parser.add_argument("--render", default=None, metavar="JSONL",
                        help="only print the markdown table of the rows in JSONL (each row with its own run's forward)")
    args = parser.parse_args()
    if args.render:
        render(args.render)
        return
    torch.set_num_threads(args.threads)

    dense = load_model("smollm2-135m")
    stream = evaluation_stream(dense.tokenizer, "wikitext2")
    tokens = calibration_tokens(dense.model, dense.tokenizer, "wikitext2", args.samples, args.seqlen, seed=0)
    forward = plain_forward_seconds(dense.model, tokens, args.batch_size)
    reference = reference_logprobs(dense.model, stream, 2048, args.kl_windows)
    rows = [{"name": "float", "ppl": score(dense.model, stream, 2048, args.windows, [])["ppl"], "kl": 0.0, "top1": 1.0,
             "mb": bytes_on_disk(dense.path) / 1e6, "seconds": 0.0}]
    del dense
    _emit(rows[-1], forward, args)
    extra = {"clip_search": not args.no_clip_search}
    for spec in [c for c in args.configs.split(",") if c]:
        method, bits, group = spec.split(":")
        opts = dict(extra, **({"act_order": args.act_order, "sequential": not args.no_sequential} if method == "gptq" else {}))
        loaded, seconds = quantize(method, int(bits), int(group), tokens, args.batch_size, opts)
        rows.append({"name": f"{method} w{bits} g{group}", **score(loaded.model, stream, 2048, args.windows, reference),
                     "mb": disk_size(loaded) / 1e6, "seconds": seconds})
        _emit(rows[-1], forward, args)
    if args.peer:
        seconds = float("nan")
        if args.peer_log:
            lines = [line for line in Path(args.peer_log).read_text().splitlines() if line.startswith("{")]
            seconds = json.loads(lines[-1])["seconds"] if lines else seconds
        rows.append(score_peer("llm-compressor GPTQModifier w4 g64", args.peer, args.peer, seconds, stream, reference, args))
        _emit(rows[-1], forward, args)
    peers = [("llm-compressor GPTQModifier", args.peer_python, "llmcompressor_gptq.py"),
             ("GPTQModel GPTQ", args.gptqmodel_python, "gptqmodel_gptq.py")]
    for label, python, script in peers:
        if python:
            rows.append(run_peer(label, python, script, tokens, stream, reference, args))
            _emit(rows[-1], forward, args)
    print_table(rows, forward, args)


def score_peer(name, folder, weights_folder, seconds, stream, reference, args):
    """Score a peer's checkpoint: ``weights_folder`` is what transformers loads here (the checkpoint
    itself, or a dequantized copy the peer script wrote when its format needs the peer's loader)."""
    from transformers import AutoModelForCausalLM

    peer = AutoModelForCausalLM.from_pretrained(weights_folder, dtype=torch.float32).eval()
    return {"name": name, **score(peer, stream, 2048, args.windows, reference),
            "mb": bytes_on_disk(folder) / 1e6, "seconds": seconds}


def run_peer(label, python, script, tokens, stream, reference, args):
    """Run a peer script in its own interpreter on this run's tokens, then score its checkpoint."""
    from safetensors.torch import save_file

    work = Path(tempfile.mkdtemp(prefix="bench-peer-"))
    try:
        save_file({"tokens": tokens.contiguous()}, str(work / "tokens.safetensors"))
        out = work / "out"
        command = [python, str(Path(__file__).parent / "peers" / script), str(resolve_model_path("smollm2-135m")),
                   str(work / "tokens.safetensors"), str(out), str(args.peer_group_size)]
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false")
        done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=work)  # peers may write logs to cwd
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        if done.returncode != 0 or not lines:
            sys.stderr.write(done.stderr[-3000:])
            raise SystemExit(f"peer {label} failed (exit {done.returncode})")
        info = json.loads(lines[-1])
        dequantized = out / "dequantized" if (out / "dequantized").is_dir() else out
        row = score_peer(f"{label} w4 g{args.peer_group_size}", out, dequantized, info["seconds"], stream, reference, args)
        row["peer_version"] = info.get("version")
        return row
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _emit(row, forward, args):
    row = dict(row, forward_seconds=forward, ratio=row["seconds"] / forward, samples=args.samples, seqlen=args.seqlen,
               windows=args.windows, kl_windows=args.kl_windows, date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    with open(args.jsonl, "a") as handle:
        handle.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)


def print_table(rows, forward, args):
    print(f"\nsmollm2-135m, GPTQ {'act-order' if args.act_order else 'no act-order'}, "
          f"{'non-sequential' if args.no_sequential else 'sequential'}, torch threads {args.threads}; "
          f"WikiText-2 perplexity at 2048 over the first {args.windows} windows; KL/top-1 vs float "
          f"over the first {args.kl_windows}; calibration {args.samples}×{args.seqlen} WikiText-2 train tokens; "
          f"plain forward over them {forward:.1f} s")
    print_rows([dict(r, forward_seconds=forward) for r in rows])


def render(path):
    """Markdown table of every row of a JSON-lines file; ÷ forward uses the forward of the row's own run."""
    print_rows([json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()])


def print_rows(rows):
    """The markdown table; each row carries the plain forward time of its run (``forward_seconds``)."""
    print("| model | ppl@2048 | KL (nats) | top-1 | MB on disk | quantize s | ÷ forward |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        ppl = f"{r['ppl']:.2f}" if r["ppl"] < 1e5 else f"{r['ppl']:.3g}"
        print(f"| {r['name']} | {ppl} | {r['kl']:.4f} | {r['top1']:.3f} | {r['mb']:.1f} | {r['seconds']:.0f} | "
              f"{r['seconds'] / r['forward_seconds']:.2f} |")


if __name__ == "__main__":
    main()
