"""Benchmark: Bone, Bat and LoRA on smollm2-135m, equal trainable-parameter budget, equal steps.

Task (synthetic, deterministic, with a held-out split): "Encode <5 digits>" -> each digit replaced by
a fixed permutation of the digits (a substitution cipher), through the chat template (empty system
prompt); the base model cannot know the cipher (exact match 0%). Each method
runs in its own process (so peak RSS is its own) with the same data, order, steps, batch and learning
rate; we record the held-out loss curve, exact-match accuracy by greedy generation on the held-out
split, seconds per step and peak memory.

    .venv/bin/python evaluation/bench_adapt.py   # defaults: 100 steps, batch 8, lr 5e-3, r 32, layers 24-29
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from compress.methods.bone.adapter import adapter_parameters, targeted_linears  # noqa: E402

SYSTEM = ""  # an empty system prompt keeps sequences short (~25 tokens)


CIPHER = str.maketrans("0123456789", "7304918265")  # a fixed digit permutation the base model cannot know


def cipher_rows(n: int, seed: int, digits: int = 5) -> list[dict]:
    """Distinct random digit strings and their digit-by-digit substitution under CIPHER."""
    rng = random.Random(seed)
    rows, seen = [], set()
    while len(rows) < n:
        s = "".join(rng.choice("0123456789") for _ in range(digits))
        if s in seen:
            continue
        seen.add(s)
        rows.append({"instruction": f"Encode {s}", "response": s.translate(CIPHER)})
    return rows


@torch.no_grad()
def exact_match(model, tok, rows: list[dict], batch_size: int = 32, max_new_tokens: int = 8) -> float:
    """Greedy generation on the prompts; a hit when the text before <|im_end|> equals the response."""
    model.eval()
    tok.padding_side = "left"
    hits = 0
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        prompts = [tok.apply_chat_template([{"role": "system", "content": SYSTEM},
                                            {"role": "user", "content": r["instruction"]}],
                                           add_generation_prompt=True, tokenize=False) for r in chunk]
        enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
        for row, ids in zip(chunk, out[:, enc["input_ids"].shape[1]:]):
            text = tok.decode(ids, skip_special_tokens=False).split("<|im_end|>")[0].strip()
            hits += text == row["response"]
    return hits / len(rows)


def run_one(args) -> dict:
    """Train one method in this process; return its measurements."""
    from compress.methods.bone.adapter import attach_adapter, trainable_parameters
    from compress.models import load_model
    from compress.train.data import pair_example
    from compress.train.loop import TrainConfig, make_accelerator, train

    torch.set_num_threads(args.threads)
    loaded = load_model("smollm2-135m")
    tok = loaded.tokenizer
    rows = cipher_rows(args.train + args.eval, seed=0)
    train_rows, eval_rows = rows[:args.train], rows[args.train:]
    to_example = lambda r: pair_example(tok, r["instruction"], r["response"], args.seqlen, SYSTEM)  # noqa: E731
    train_set, eval_set = [to_example(r) for r in train_rows], [to_example(r) for r in eval_rows]
    layers = list(range(args.first_layer, loaded.model.config.num_hidden_layers))
    model = attach_adapter(loaded.model, args.one, args.r, layers=layers, seed=0)
    config = TrainConfig(steps=args.steps, lr=args.lr, batch_size=args.batch_size, eval_every=args.eval_every, seed=0)
    started = time.perf_counter()
    result = train(model, train_set, eval_set, config, pad_id=tok.pad_token_id, accelerator=make_accelerator(1, "cpu"))
    wall = time.perf_counter() - started
    accuracy = exact_match(model, tok, eval_rows)
    return {"method": args.one, "r": args.r, "trainable": trainable_parameters(model), "eval_losses": result.eval_losses,
            "final_train_loss": result.final_train_loss, "accuracy": accuracy, "seconds_per_step": result.seconds_per_step,
            "train_wall_s": wall, "peak_rss_bytes": result.peak_memory_bytes,
            "tokens_per_step": sum(len(e.input_ids) for e in train_set) / len(train_set) * args.batch_size}


def base_accuracy(args) -> float:
    from compress.models import load_model

    torch.set_num_threads(args.threads)
    loaded = load_model("smollm2-135m")
    return exact_match(loaded.model, loaded.tokenizer, cipher_rows(args.train + args.eval, seed=0)[args.train:])


def matched_ranks(r_block: int, first_layer: int) -> dict[str, int]:
    """Bone and Bat at r; LoRA at the rank whose parameter count is closest to theirs."""
    from compress.models import load_model

    model = load_model("smollm2-135m", tokenizer=False).model
    layers = list(range(first_layer, model.config.num_hidden_layers))
    modules = targeted_linears(model, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
                               layers)
    budget = adapter_parameters("bone", r_block, modules)
    r_lora = min(range(1, 577), key=lambda r: abs(adapter_parameters("lora", r, modules) - budget))
    return {"bone": r_block, "bat": r_block, "lora": r_lora}


def table(results: list[dict], args, base_acc: float) -> str:
    steps = [s for s, _ in results[0]["eval_losses"]]
    lines = [f"# Adapters on smollm2-135m: Bone vs Bat vs LoRA ({datetime.date.today().isoformat()})", "",
             f"Task: \"Encode <5 digits>\" -> a fixed digit substitution cipher (0123456789 -> 7304918265), chat template, empty system prompt; {args.train} training pairs, "
             f"{args.eval} held-out pairs (loss and exact match by greedy generation). {args.steps} steps, batch "
             f"{args.batch_size}, AdamW lr {args.lr} (constant, no warm-up), float32, "
             f"{args.threads} CPU threads. Adapters on all seven projections of decoder layers "
             f"{args.first_layer}-29 (the lower layers frozen and without adapters, to keep backward short). "
             f"LoRA alpha = 2r. Base model exact match before training: {base_acc:.1%}.", "",
             "Caveat: the 2-core CPU was shared with 3-4 other engineers' jobs while this ran; seconds per step "
             "and tokens/s are noisy (relative order within one run is more telling than absolute values). "
             "One seed, one learning rate: a small-scale check, not a tuned comparison.", "",
             "| method | r | trainable params | eval loss " + " | ".join(f"@{s}" for s in steps) +
             " | final train loss | exact match | s/step | peak RSS (GiB) |",
             "|---|---|---|" + "---|" * len(steps) + "---|---|---|---|"]
    for res in results:
        curve = " | ".join(f"{l:.3f}" for _, l in res["eval_losses"])
        lines.append(f"| {res['method']} | {res['r']} | {res['trainable']:,} | {curve} | {res['final_train_loss']:.3f} | "
                     f"{res['accuracy']:.1%} | {res['seconds_per_step']:.2f} | {res['peak_rss_bytes'] / 2**30:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--r", type=int, default=32, help="Bone/Bat block size; LoRA's rank is matched to it.")
    parser.add_argument("--first-layer", type=int, default=24, help="Adapt decoder layers first-layer..29.")
    parser.add_argument("--train", type=int, default=800)
    parser.add_argument("--eval", type=int, default=64)
    parser.add_argument("--seqlen", type=int, default=64)
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--methods", default="bone,bat,lora")
    parser.add_argument("--out", default=str(REPO / "evaluation" / "results" / "adapt-smollm2.md"))
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one method, print JSON
    parser.add_argument("--base", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("COMPRESS_PROGRESS", "0")
    if args.one:
        print("RESULT " + json.dumps(run_one(args)))
        return
    if args.base:
        print("RESULT " + json.dumps(base_accuracy(args)))
        return
    ranks = matched_ranks(args.r, args.first_layer)
    forwarded, skip = [], False  # the children get every flag but --out (as "--out X" or "--out=X")
    for a in sys.argv[1:]:
        if skip or a.startswith("--out="):
            skip = False
        elif a == "--out":
            skip = True
        else:
            forwarded.append(a)
    base_acc = _child(forwarded + ["--base"])
    results = []
    for method in args.methods.split(","):
        child = [a for a in forwarded]
        results.append(_child(child + ["--one", method, "--r", str(ranks[method])]))
        print(json.dumps(results[-1]), flush=True)
    text = table(results, args, base_acc)
    print(text)
    Path(args.out).write_text(text)


def _child(argv: list[str]):
    """Run this script in a fresh process (its own peak RSS) and parse its RESULT line."""
    done = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:
        raise SystemExit(f"child {argv} failed:\n{done.stderr[-3000:]}")
    line = [l for l in done.stdout.splitlines() if l.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


if __name__ == "__main__":
    main()
