"""Benchmark of fine-tuning transfer on smollm2-135m, all on CPU.

Procedure (every size is a flag; the defaults fit a shared 2-core CPU in about a quarter of an hour):

1. v1 = smollm2-135m. v2 = v1 after continued training on WikiText-2 train windows. A full-weight
   run of a few hundred steps does not fit the CPU budget, so the stated cheaper procedure trains the
   top ``--v2-layers`` decoder layers and the final norm (AdamW on cached inputs of the first of them, ``--v2-steps`` steps of
   ``--v2-batch`` × ``--v2-seqlen`` tokens); the rest of v2 equals v1.
2. The skill: swap two words (``Swap: w1 w2 =>`` → `` w2 w1``), single-token words, the pairs of the
   evaluation split never seen in training. Accuracy = exact match of both answer tokens under
   greedy decoding (computed teacher-forced: all argmaxes right ⇔ greedy generates the answer).
   v1-ft = v1 fine-tuned on it (top ``--ft-layers`` layers, plain torch AdamW, loss on the answer).
3. v2 + Δ: ``compress.methods.transfer.transfer(v1, v1-ft, v2)``; v2 + rank-K Δ: ``extract --rank K`` then
   ``apply`` (artifact size reported).
4. Perplexity on the WikiText-2 test stream: the first ``--ppl-windows`` windows of ``--ppl-seqlen``.
5. A transfer in a subprocess: peak resident memory (sampled every 5 ms, and the kernel's VmHWM)
   against the largest tensor, and wall time against reading the three checkpoints.

Run: ``.venv/bin/python evaluation/bench_transfer.py`` (writes evaluation/results/transfer-smollm2.md).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("apple river stone cloud green house water light music paper table chair window garden money "
         "horse dog cat bird fish tree flower night morning summer winter city road train ship king queen "
         "church school market doctor teacher father mother brother sister child friend army power energy "
         "metal glass gold silver iron wood fire earth island forest mountain valley field bridge tower "
         "castle village street letter story movie film game party union bank price value car truck plane "
         "ocean desert snow rain wind storm sun moon star planet space science history language art "
         "picture camera phone computer machine engine wheel door wall floor roof kitchen bed box bag "
         "bottle cup plate knife sword shield blue red black white yellow brown orange purple north south "
         "east west coffee tea bread cheese milk sugar salt rice corn wine beer egg").split()


def single_token_words(tokenizer) -> list[int]:
    """Token ids of `` word`` for the words that are one token with a leading space."""
    ids = []
    for word in WORDS:
        piece = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
        if len(piece) == 1:
            ids.append(piece[0])
    return sorted(set(ids))


def task_examples(tokenizer, count_train: int, count_eval: int, seed: int = 0):
    """(train, eval) LongTensors (n, P + 2): prompt ``Swap: w1 w2 =>`` then the answer `` w2 w1``."""
    words = single_token_words(tokenizer)
    pairs = [(a, b) for a in words for b in words if a != b]
    random.Random(seed).shuffle(pairs)
    if len(pairs) < count_train + count_eval:
        raise SystemExit(f"only {len(pairs)} word pairs for {count_train} + {count_eval} examples")
    head = tokenizer("Swap:", add_special_tokens=False)["input_ids"]
    tail = tokenizer(" =>", add_special_tokens=False)["input_ids"]
    rows = [head + [a, b] + tail + [b, a] for a, b in pairs[:count_train + count_eval]]
    data = torch.tensor(rows)  # (n, P + 2)
    return data[count_eval:], data[:count_eval]


def answer_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """Logits predicting the two answer tokens: (n, 2, V); lm_head only on those positions."""
    hidden = model.model(input_ids=ids[:, :-1], use_cache=False).last_hidden_state  # (n, P + 1, H)
    return model.lm_head(hidden[:, -2:])


@torch.no_grad()
def task_accuracy(model, data: torch.Tensor, batch: int = 32) -> float:
    correct = 0
    for start in range(0, len(data), batch):
        ids = data[start:start + batch]
        guess = answer_logits(model, ids).argmax(-1)  # (b, 2)
        correct += int((guess == ids[:, -2:]).all(dim=1).sum())
    return correct / len(data)


@torch.no_grad()
def layer_inputs(model, ids: torch.Tensor, layer: int, batch: int = 16) -> torch.Tensor:
    """Hidden states entering decoder layer ``layer`` (n, T, H), computed once under no_grad."""
    out = []
    for start in range(0, len(ids), batch):
        states = model.model(input_ids=ids[start:start + batch], output_hidden_states=True, use_cache=False)
        out.append(states.hidden_states[layer])  # hidden_states[0] is the embedding output
    return torch.cat(out)


def top_forward(model, first: int, hidden: torch.Tensor) -> torch.Tensor:
    """Final hidden states from layer ``first`` on, given that layer's inputs (n, T, H).

    The decoder is called with ``inputs_embeds`` and only its top layers, so it builds the causal
    mask and rotary embeddings as usual while the frozen lower layers are not recomputed.
    """
    layers = model.model.layers
    model.model.layers = layers[first:]
    try:
        return model.model(inputs_embeds=hidden, use_cache=False).last_hidden_state
    finally:
        model.model.layers = layers


def train_top_layers(model, layers: int, steps: int, lr: float, batches, loss_fn, what: str) -> list[float]:
    """AdamW on the top ``layers`` decoder layers and the final norm; everything else frozen.

    ``batches(step)`` gives the cached inputs of the first trained layer (and targets) for a step.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    params = [p for layer in model.model.layers[-layers:] for p in layer.parameters()]
    params += list(model.model.norm.parameters())
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    start = time.perf_counter()
    for step in range(steps):
        loss = loss_fn(model, *batches(step))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if step % 10 == 0 or step == steps - 1:
            print(f"  {what} step {step + 1}/{steps} loss {losses[-1]:.3f} ({time.perf_counter() - start:.0f} s)",
                  flush=True)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return losses


def train_v2(v1, work: Path, args) -> list[float]:
    """v2: continued training of v1 on WikiText-2 train (top layers, inputs of the first one cached)."""
    from compress.data import calibration_tokens
    from compress.models import load_model

    tokenizer, v1_folder = v1.tokenizer, v1.path
    n_layers = v1.model.config.num_hidden_layers
    windows = calibration_tokens(v1.model, tokenizer, "wikitext2", args.v2_steps * args.v2_batch, args.v2_seqlen, 1)
    model = load_model("smollm2-135m", tokenizer=False).model
    first = n_layers - args.v2_layers
    cached = layer_inputs(model, windows, first)  # (steps·batch, seqlen, H)

    def v2_loss(m, hidden, ids):
        logits = m.lm_head(top_forward(m, first, hidden)[:, :-1])  # (b, T-1, V)
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten())

    def v2_batch(step):
        rows = slice(step * args.v2_batch, (step + 1) * args.v2_batch)
        return cached[rows], windows[rows]

    v2_losses = train_top_layers(model, args.v2_layers, args.v2_steps, args.v2_lr, v2_batch, v2_loss, "v2")
    save_version(model, v1_folder, work / "v2")
    return v2_losses


def train_ft(v1, train, work: Path, args) -> list[float]:
    """v1-ft: the skill fine-tune of v1 (top layers), loss on the two answer tokens only."""
    model, v1_folder, n_layers = v1.model, v1.path, v1.model.config.num_hidden_layers
    ft_first = n_layers - args.ft_layers
    inputs = train[:, :-1]  # the answer's last token is a target, never an input
    cached = layer_inputs(model, inputs, ft_first)  # (n, P + 1, H)

    def ft_loss(m, hidden, ids):
        logits = m.lm_head(top_forward(m, ft_first, hidden)[:, -2:])  # (b, 2, V)
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), ids[:, -2:].flatten())

    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))

    def ft_batch(step):
        rows = order[(torch.arange(args.ft_batch) + step * args.ft_batch) % len(train)]
        return cached[rows], train[rows]

    ft_losses = train_top_layers(model, args.ft_layers, args.ft_steps, args.ft_lr, ft_batch, ft_loss, "fine-tune")
    save_version(model, v1_folder, work / "v1-ft")
    return ft_losses



def save_version(model, source_folder: Path, folder: Path) -> None:
    if folder.exists():
        shutil.rmtree(folder)
    model.save_pretrained(folder)
    for name in os.listdir(source_folder):
        if name.startswith("tokenizer") or name.startswith("chat_template") or name == "special_tokens_map.json":
            shutil.copyfile(source_folder / name, folder / name)


def evaluate(folder: Path, stream, data, args) -> dict:
    from compress.models import load_model
    from compress.metrics.perplexity import perplexity

    model = load_model(str(folder), tokenizer=False).model
    start = time.perf_counter()
    accuracy = task_accuracy(model, data)
    ppl = perplexity(model, stream, args.ppl_seqlen, windows=args.ppl_windows).perplexity
    return {"accuracy": accuracy, "perplexity": ppl, "eval_s": time.perf_counter() - start}


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.suffix == ".safetensors")


CHILD = r"""
import json, os, sys, threading, time
def rss():
    out = {}
    for line in open('/proc/self/status'):
        key, _, value = line.partition(':')
        if key in ('VmRSS', 'RssAnon', 'VmHWM'):
            out[key] = int(value.split()[0]) * 1024
    return out
import torch
from compress.methods.transfer import transfer
from compress.methods.transfer.checkpoint import Checkpoint
from compress.progress import set_progress
set_progress(False)
mode, args = sys.argv[1], sys.argv[2:]
baseline = rss()
peak = dict(baseline)
stop = False
def sample():
    while not stop:
        for k, v in rss().items():
            peak[k] = max(peak.get(k, 0), v)
        time.sleep(0.005)
thread = threading.Thread(target=sample, daemon=True); thread.start()
start = time.perf_counter()
if mode == 'transfer':
    transfer(args[0], args[1], args[2], args[3])
else:
    for folder in args:
        ckpt = Checkpoint(folder)
        for name, info in ckpt.tensors.items():
            step = max(1, (32 << 20) // max(1, info.row_bytes))
            for a in range(0, info.rows, step):
                ckpt.read(name, a, min(info.rows, a + step))
wall = time.perf_counter() - start
stop = True; thread.join()
for k, v in rss().items():
    peak[k] = max(peak.get(k, 0), v)
print(json.dumps({'wall_s': wall, 'baseline': baseline, 'peak': peak}))
"""


def run_child(*argv) -> dict:
    result = subprocess.run([sys.executable, "-c", CHILD, *map(str, argv)], capture_output=True, text=True,
                            cwd=ROOT, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="/tmp/bench-transfer")
    parser.add_argument("--v2-layers", type=int, default=6)
    parser.add_argument("--v2-steps", type=int, default=40)
    parser.add_argument("--v2-batch", type=int, default=1)
    parser.add_argument("--v2-seqlen", type=int, default=32)
    parser.add_argument("--v2-lr", type=float, default=2e-4)
    parser.add_argument("--ft-layers", type=int, default=4)
    parser.add_argument("--ft-steps", type=int, default=40)
    parser.add_argument("--ft-batch", type=int, default=8)
    parser.add_argument("--ft-lr", type=float, default=3e-4)
    parser.add_argument("--train-examples", type=int, default=96)
    parser.add_argument("--eval-examples", type=int, default=48)
    parser.add_argument("--ppl-seqlen", type=int, default=256)
    parser.add_argument("--ppl-windows", type=int, default=2)
    parser.add_argument("--ranks", default="1,4,16")
    parser.add_argument("--reuse", choices=["none", "v2", "all"], default="none",
                        help="Reuse v2 (or v2 and v1-ft) made by a previous run in --work.")
    parser.add_argument("--out", default=str(ROOT / "evaluation" / "results" / "transfer-smollm2.md"))
    parser.add_argument("--machine", default=f"{os.cpu_count()} CPU cores, no GPU.",
                        help="how the machine was during the run (shared or idle), written into the results")
    args = parser.parse_args()
    torch.manual_seed(0)
    from compress.data import evaluation_stream
    from compress.models import load_model
    from compress.progress import set_progress
    from compress.methods.transfer import apply, extract, transfer

    set_progress(False)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    v1 = load_model("smollm2-135m")
    v1_folder, tokenizer = v1.path, v1.tokenizer
    stream = evaluation_stream(tokenizer, "wikitext2")
    train, held_out = task_examples(tokenizer, args.train_examples, args.eval_examples)
    print(f"task: {len(train)} train / {len(held_out)} held-out pairs", flush=True)

    saved = json.loads((work / "train.json").read_text()) if (work / "train.json").is_file() else {}
    if args.reuse not in ("v2", "all") or "v2" not in saved:
        saved["v2"] = train_v2(v1, work, args)
    if args.reuse != "all" or "ft" not in saved:
        saved["ft"] = train_ft(v1, train, work, args)
        saved["seconds"] = time.perf_counter() - t0
    (work / "train.json").write_text(json.dumps(saved))
    v2_losses, ft_losses, train_s = saved["v2"], saved["ft"], saved["seconds"]
    del v1

    # Transfers.
    rows, outputs = [], {}
    start = time.perf_counter()
    shutil.rmtree(work / "v2+delta", ignore_errors=True)
    report = transfer(str(v1_folder), str(work / "v1-ft"), str(work / "v2"), work / "v2+delta")
    transfer_s = time.perf_counter() - start
    total = report.total()
    outputs["v2 + Δ"] = (work / "v2+delta", "")
    for rank in [int(r) for r in args.ranks.split(",") if r]:
        for name in (f"diff-r{rank}", f"v2+delta-r{rank}"):
            shutil.rmtree(work / name, ignore_errors=True)
        description = extract(str(v1_folder), str(work / "v1-ft"), work / f"diff-r{rank}", rank=rank)
        apply(work / f"diff-r{rank}", str(work / "v2"), work / f"v2+delta-r{rank}")
        kept = [m["kept_energy"] for m in description["tensors"].values() if "kept_energy" in m and m["energy"] > 0]
        outputs[f"v2 + rank-{rank} Δ"] = (work / f"v2+delta-r{rank}",
                                          f"artifact {folder_bytes(work / f'diff-r{rank}') / 2**20:.1f} MiB, "
                                          f"kept energy min {min(kept):.3f}")

    models = {"v1 base": (v1_folder, ""), "v1 fine-tuned": (work / "v1-ft", ""), "v2 base": (work / "v2", ""),
              **outputs}
    results = {}
    for label, (folder, note) in models.items():
        results[label] = evaluate(folder, stream, held_out, args)
        print(f"  {label}: {results[label]}", flush=True)

    # Memory and time of one transfer against reading the three checkpoints.
    shutil.rmtree(work / "mem-out", ignore_errors=True)
    mem = run_child("transfer", v1_folder, work / "v1-ft", work / "v2", work / "mem-out")
    read = run_child("read", v1_folder, work / "v1-ft", work / "v2")
    from compress.methods.transfer.checkpoint import Checkpoint

    largest = max(info.nbytes for info in Checkpoint(work / "v2").tensors.values())

    gain = results["v1 fine-tuned"]["accuracy"] - results["v1 base"]["accuracy"]
    lines = [
        "# Fine-tuning transfer on smollm2-135m (CPU)",
        "",
        f"Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC. Machine: {args.machine}",
        "",
        f"- v2 = v1 after continued training on WikiText-2 train: top {args.v2_layers} decoder layers + final norm "
        f"(inputs of the first trained layer computed once, the frozen layers not recomputed), "
        f"{args.v2_steps} AdamW steps of {args.v2_batch}×{args.v2_seqlen} tokens, lr {args.v2_lr} "
        f"(loss, mean of 10 steps: first {sum(v2_losses[:10]) / len(v2_losses[:10]):.3f}, last "
        f"{sum(v2_losses[-10:]) / len(v2_losses[-10:]):.3f}); the "
        f"cheaper stated procedure, a full-weight run did not fit the shared CPU.",
        f"- Skill: `Swap: w1 w2 =>` → ` w2 w1` over {len(single_token_words(tokenizer))} single-token words; "
        f"{len(train)} training pairs, {len(held_out)} held-out pairs (never trained on); accuracy = exact match "
        f"of both answer tokens (greedy).",
        f"- v1 fine-tuned: top {args.ft_layers} layers + final norm, {args.ft_steps} AdamW steps of {args.ft_batch} "
        f"examples, lr {args.ft_lr} (loss {ft_losses[0]:.3f} → {ft_losses[-1]:.3f}).",
        f"- Perplexity: WikiText-2 test, first {args.ppl_windows} windows of {args.ppl_seqlen} tokens "
        f"(non-overlapping), so not comparable with the 2048-token numbers elsewhere.",
        f"- Compatibility report of the transfer: ‖Δ‖/‖θ_v1‖ = {total['delta_rel']:.4f}, "
        f"‖v2 − v1‖/‖v1‖ = {total['drift_rel']:.4f}, cosine(v2, v1) = {total['cosine']:.6f}; "
        f"warnings: {report.warnings() or 'none'}.",
        "",
        "| model | held-out task accuracy | WikiText-2 ppl | share of the fine-tune's gain | note |",
        "|---|---|---|---|---|",
    ]
    base = results["v2 base"]["accuracy"]
    for label, (folder, note) in models.items():
        r = results[label]
        share = "" if label.startswith("v1") or gain <= 0 else f"{(r['accuracy'] - base) / gain:.2f}"
        lines.append(f"| {label} | {r['accuracy']:.3f} | {r['perplexity']:.2f} | {share} | {note} |")
    lines += [
        "",
        "Share of the gain = (accuracy − v2 base accuracy) / (v1 fine-tuned − v1 base accuracy).",
        "",
        "## Memory and time of one transfer (v1-ft − v1 onto v2, float32, 135M parameters)",
        "",
        "| measure | value |",
        "|---|---|",
        f"| largest tensor (embed_tokens, float32) | {largest / 2**20:.1f} MiB |",
        f"| checkpoint size (each of three) | {folder_bytes(work / 'v2') / 2**20:.1f} MiB |",
        f"| process RSS after imports (baseline) | {mem['baseline']['VmRSS'] / 2**20:.1f} MiB |",
        f"| peak RSS during transfer (VmHWM) | {mem['peak']['VmHWM'] / 2**20:.1f} MiB |",
        f"| peak RSS − baseline | {(mem['peak']['VmHWM'] - mem['baseline']['VmRSS']) / 2**20:.1f} MiB "
        f"= {(mem['peak']['VmHWM'] - mem['baseline']['VmRSS']) / largest:.2f} × largest tensor |",
        f"| peak anonymous RSS − baseline (sampled every 5 ms) | "
        f"{(mem['peak']['RssAnon'] - mem['baseline']['RssAnon']) / 2**20:.1f} MiB "
        f"= {(mem['peak']['RssAnon'] - mem['baseline']['RssAnon']) / largest:.2f} × largest tensor |",
        f"| transfer wall time (subprocess, page cache warm) | {mem['wall_s']:.2f} s |",
        f"| reading the three checkpoints, same reader and blocks | {read['wall_s']:.2f} s |",
        f"| ratio | {mem['wall_s'] / read['wall_s']:.2f} |",
        f"| in-process transfer with progress (first run) | {transfer_s:.2f} s |",
        "",
        f"Training and saving v2 and v1-ft took {train_s:.0f} s; the whole benchmark "
        f"{time.perf_counter() - t0:.0f} s.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
