"""Zebra-Llama distillation of smollm2-135m on this CPU: what ILD, SMART and end-to-end KD buy.

Protocol (one run, one process, ``--threads`` CPU threads, float32, seed 0):

* Training text: the WikiText-2 train excerpt, cut into disjoint ``--seqlen``-token windows by
  :func:`compress.distill.plan.make_plan` (the same split as ``compress distill``): ``--ild-tokens`` for
  ILD, ``--smart-tokens`` held out for SMART (and as KD's evaluation set), ``--kd-tokens`` for KD.
  **Every trained row sees the very same ILD and KD windows, in the same order.**
* Ranks: r_q 384 (the default), ``--kv-rank`` 112 and ``--rope-dim`` 32, so that 4 MLA layers of 30
  hold 4 · 144 / (30 · 384) = 5.00% of the teacher's KV cache (the default r_kv 128 gives 5.56%, above
  the 5% goal). ILD (both mixers of every layer) runs once and every row built from MLA / Mamba2
  mixers takes its mixers from that one bank; the all-MLA row has its own ILD (MLA only,
  ``--all-mla-kv-rank`` 11 and ``--all-mla-rope-dim`` 8: (11 + 8) / 384 = 4.95%).
* SMART measures the ILD'd all-Mamba2 student on the held-out windows and picks ``--n-mla`` layers.
* Rows: the teacher; the untrained hybrid (SMART's layers, ``hybridize`` init); after ILD (no KD);
  after ILD + KD for SMART's choice, evenly spaced MLA layers, first-and-last (the first ⌈K/2⌉ and last
  ⌊K/2⌋ layers) at the same K; all-MLA at a similar KV fraction; a 50%-attention MambaInLlama-style
  hybrid (attention kept in the even layers, ILD'd Mamba2 in the odd ones). KD: ``--kd-tokens`` tokens
  (``--batch-size`` windows per step), lr ``--lr``, KL(teacher ‖ student) at temperature 1.
* Columns: KV cache fraction (:func:`compress.metrics.cost.kv_cache_fraction`); WikiText-2 test
  perplexity at ``--eval-seqlen`` over the first ``--windows`` non-overlapping windows, and on the same
  windows the mean KL(teacher ‖ model) and top-1 agreement with the teacher, all rows in one pass
  (:func:`evaluate_all`: per window the teacher runs once and every model is scored against its logits,
  streamed over vocabulary chunks as :mod:`compress.metrics.logits`); decode tokens/s after a prefill of
  ``--decode-context`` random tokens (``--decode-steps`` greedy steps after 2 untimed ones), measured once
  per architecture (the layer kinds' counts: where the MLA layers sit does not change the work); training
  tokens (the distinct ILD and KD tokens the row was trained on) and training wall time (the ILD the
  row needs: all of it, half for the 50%-attention row whose MLA mixers go unused, the all-MLA row's
  own; SMART's measurement for the SMART rows; KD without the curve's evaluations).
* Curve: for SMART's row, perplexity on the first ``--curve-windows`` windows at ``--curve-points``
  evenly spaced KD steps, against KD tokens: where the budget a GPU box needs can be read.

    .venv/bin/python -m evaluation.bench_distill --out evaluation/results/distill-smollm2.md --work /tmp/bench_distill

With ``--work DIR`` every finished stage is kept there (the ILD banks, SMART's measurement, each trained
row's weights and KD record, the evaluation after every window, the decode speeds); the same command
run again continues after the last finished stage (a row killed inside KD is trained again from its
start), and refuses a folder of other settings. Stage times are those of the run that did the stage.

Expected cost on the 2-core development CPU, from the timed CPU recipe (recipes/smollm2-135m-zebra-distill.yaml:
ILD of both mixers ≈ 23 s per layer and epoch on 32768 tokens, SMART ≈ 13 s per layer on 4096 tokens, a KD
step of 8 × 512 tokens ≈ 60 s): ILD ≈ 23 min (2 epochs) + 12 min (the all-MLA row's), SMART ≈ 7 min, KD
≈ 16 min per trained row × 5, the evaluation pass ≈ 27 min (8 models × 40 windows at 2048), decode ≈ 4
min: about 2 h of training and 2.5 h in all, so run it with ``--work`` and continue it when cut off.
Measured on 2026-12-03 (idle): ILD 19 min, SMART 10 min, KD 11–15 min per row, the all-MLA ILD 9 min (105 min
of training), but the evaluation pass ≈ 45 min (about 70 s per window for the 8 models): 2 h 40 min in all.
KD at 8 × 512 tokens holds about 21 GB at its peak on this CPU (the activations of 30 layers kept for
the backward).

Smoke test on a tiny model (seconds; not a measurement):

    .venv/bin/python -m evaluation.bench_distill --model TINY_FOLDER --data FILE --seqlen 32 --ild-tokens 256 \\
        --smart-tokens 64 --kd-tokens 256 --batch-size 4 --n-mla 1 --eval-seqlen 64 --windows 2 \\
        --decode-context 64 --decode-steps 2 --curve-windows 1 --curve-points 2 --kv-rank 8 --rope-dim 4 \\
        --all-mla-kv-rank 4 --all-mla-rope-dim 2
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import torch


class Work:
    """The run's stages on disk (``--work``): a rerun with the same settings continues after the last
    finished stage (ILD banks, SMART, each trained row, each evaluated window), so the benchmark can be
    run in pieces. Without ``--work`` nothing is kept."""

    def __init__(self, folder: str | None, settings: dict):
        self.folder = Path(folder) if folder else None
        if self.folder is None:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        stored = self.read("settings")
        if stored is not None and stored != settings:
            changed = sorted(k for k in set(stored) | set(settings) if stored.get(k) != settings.get(k))
            raise SystemExit(f"error: {self.folder} holds a run with other settings ({', '.join(changed)}); "
                             "use another --work folder")
        self.write("settings", settings)

    def read(self, name: str):
        path = self.folder / f"{name}.json" if self.folder else None
        return json.loads(path.read_text()) if path is not None and path.is_file() else None

    def write(self, name: str, value) -> None:
        if self.folder is not None:
            tmp = self.folder / f"{name}.json.tmp"
            tmp.write_text(json.dumps(value, indent=1, default=str))
            os.replace(tmp, self.folder / f"{name}.json")

    def tensors(self, name: str) -> Path | None:
        return self.folder / f"{name}.safetensors" if self.folder else None


def ild_bank(teacher, tokens, ranks, mixers, args, work: Work, name: str) -> tuple[dict, float]:
    from safetensors.torch import load_file, save_file

    from compress.distill.ild import ILDConfig, LayerDistillation
    from compress.distill.state import flatten_bank, unflatten_bank
    from compress.walk import walk

    done, path = work.read(name), work.tensors(name)
    if done is not None and path.is_file():
        print(f"{name}: from {path} ({done['seconds']:.0f} s when it ran)", flush=True)
        return unflatten_bank(load_file(str(path))), done["seconds"]
    method = LayerDistillation(ILDConfig(q_rank=ranks[0], kv_rank=ranks[1], rope_dim=ranks[2], mixers=mixers,
                                         epochs=args.ild_epochs, lr=args.ild_lr, seed=0))
    method.prepare(teacher)
    started = time.perf_counter()
    walk(teacher, tokens, [method], device="cpu", batch_size=args.batch_size)
    seconds = time.perf_counter() - started
    if path is not None:
        save_file(flatten_bank(method.bank), str(path))
        work.write(name, {"seconds": seconds})
    return method.bank, seconds


@torch.no_grad()
def decode_speed(model, context: int, steps: int) -> float:
    """Greedy decode tokens/s after a prefill of ``context`` random tokens (as evaluation/bench_hybrid.py)."""
    model.eval()
    ids = torch.randint(0, model.config.vocab_size, (1, context), generator=torch.Generator().manual_seed(0))
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    cache, nxt = out.cache, out.logits[:, -1:].argmax(-1)
    for i in range(steps + 2):
        if i == 2:
            started = time.perf_counter()
        out = model(input_ids=nxt, cache=cache, use_cache=True)
        cache, nxt = out.cache, out.logits[:, -1:].argmax(-1)
    return steps / (time.perf_counter() - started)


@torch.no_grad()
def evaluate_all(models: dict, teacher, stream, args, work: Work) -> dict[str, dict]:
    """Perplexity, KL(teacher ‖ model) and top-1 agreement of every model on the same windows, in one pass:
    per window the teacher runs once and its logits (streamed over vocabulary chunks) are shared by all
    models; the teacher's own row is scored from the same source. Saved after every window."""
    from compress.metrics.fidelity import window_fidelity
    from compress.metrics.logits import logit_source
    from compress.metrics.perplexity import window_starts

    starts = window_starts(stream.numel(), args.eval_seqlen, args.eval_seqlen, args.windows)
    acc = work.read("evaluation") or {}
    names = ["teacher", *models]
    for name in names:
        acc.setdefault(name, {"windows": 0, "losses": [], "kl_sum": 0.0, "agree": 0, "positions": 0, "seconds": 0.0})
    for w, start in enumerate(starts):
        if all(acc[name]["windows"] > w for name in names):
            continue
        ids = stream[start:start + args.eval_seqlen][None]
        started = time.perf_counter()
        reference = logit_source(teacher, ids)
        shared_seconds = time.perf_counter() - started
        for name in names:
            if acc[name]["windows"] > w:
                continue
            started = time.perf_counter()
            nll, kl, agreeing = window_fidelity(reference if name == "teacher" else models[name], ids, reference)
            a = acc[name]
            a["losses"].append(nll.item())
            a["kl_sum"] += kl.item()
            a["agree"] += agreeing
            a["positions"] += ids.numel()
            a["seconds"] += time.perf_counter() - started + (shared_seconds if name == "teacher" else 0.0)
            a["windows"] = w + 1
        work.write("evaluation", acc)
        print(f"evaluated window {w + 1}/{len(starts)}", flush=True)
    return {name: {"perplexity": math.exp(sum(a["losses"]) / len(a["losses"])), "kl": a["kl_sum"] / a["positions"],
                   "top1": a["agree"] / a["positions"], "eval_seconds": round(a["seconds"])}
            for name, a in acc.items() if name in names}


def kd(student, teacher, plan, args, curve: list | None, stream) -> tuple[int, float]:
    """KD on the plan's windows; returns (KD tokens, training seconds without the curve's evaluations)."""
    from compress.distill.kd import train_kd
    from compress.metrics.perplexity import perplexity
    from compress.train.loop import TrainConfig, make_accelerator

    points = {max(1, round(plan.kd_steps * (i + 1) / args.curve_points)) for i in range(args.curve_points)}
    per_step = args.batch_size * args.seqlen
    evaluating = [0.0]

    def point(step):
        started = time.perf_counter()
        student.eval()
        value = perplexity(student, stream, args.eval_seqlen, None, args.curve_windows).perplexity
        curve.append({"kd_tokens": step * per_step, "perplexity": value})
        print(json.dumps({"curve": curve[-1]}), flush=True)
        student.train()
        evaluating[0] += time.perf_counter() - started

    config = TrainConfig(steps=plan.kd_steps, lr=args.lr, batch_size=args.batch_size, seed=0)
    started = time.perf_counter()
    if curve is not None:
        point(0)
    train_kd(student, teacher, plan.kd_tokens, None, config, make_accelerator(1, "cpu"),
             on_step=lambda step, state: point(step) if curve is not None and step in points else None)
    return int(plan.kd_tokens.numel()), time.perf_counter() - started - evaluating[0]


def trained_row(key: str, build, teacher, plan, args, stream, work: Work, with_curve: bool) -> tuple:
    """(student, record) of one KD row: trained here, or loaded from ``--work`` when it was trained before."""
    from safetensors.torch import load_model, save_model

    student, done, path = build(), work.read(key), work.tensors(key)
    if done is not None and path.is_file():
        load_model(student, str(path))
        print(f"{key}: from {path}", flush=True)
        return student.eval(), done
    curve: list | None = [] if with_curve else None
    tokens, seconds = kd(student, teacher, plan, args, curve, stream)
    record = {"kd_tokens": tokens, "kd_seconds": seconds, "curve": curve}
    if path is not None:
        save_model(student, str(path))
        work.write(key, record)
    return student.eval(), record


def placements(n: int, k: int, smart: list[int]) -> dict[str, list[int]]:
    from compress.distill.smart import evenly_spaced

    first_last = sorted(set(range(-(-k // 2))) | set(range(n - k // 2, n)))
    return {"SMART": smart, "evenly spaced": evenly_spaced(n, k), "first and last": first_last}


def run(args) -> tuple[list[dict], list[dict], dict]:
    import compress
    from compress.data import evaluation_stream
    from compress.distill.config import DistillConfig
    from compress.distill.kd import assemble, load_mixer
    from compress.distill.plan import make_plan
    from compress.distill.smart import choose_layers, measure_sensitivities
    from compress.hybrid.build import build_mixer, hybrid_config, hybridize, parent_shape
    from compress.metrics.cost import is_hybrid, kv_cache_fraction

    from compress.hybrid.build import MLA_INIT

    settings = {k: v for k, v in vars(args).items() if k not in ("threads", "out", "work")} | {"mla_init": MLA_INIT}
    work = Work(args.work, settings)
    loaded = compress.load(args.model)
    teacher, tok = loaded.model.eval(), loaded.tokenizer
    stream = evaluation_stream(tok, "wikitext2")
    config = DistillConfig(data=args.data, seqlen=args.seqlen, ild_tokens=args.ild_tokens,
                           smart_tokens=args.smart_tokens, kd_tokens=args.kd_tokens, batch_size=args.batch_size,
                           n_mla=args.n_mla, kv_rank=args.kv_rank, rope_dim=args.rope_dim)
    plan = make_plan(teacher, tok, config)
    n, ranks = plan.layers, plan.ranks
    bank, ild_s = ild_bank(teacher, plan.ild_tokens, ranks, ["mla", "mamba2"], args, work, "ild")
    ild_tokens = int(plan.ild_tokens.numel())

    smart_record = work.read("smart")
    if smart_record is None:
        mla_config = hybrid_config(teacher.config, parent_shape(teacher), ["mla"] * n, *ranks)
        student = assemble(teacher, bank, ["mamba2"] * n, ranks)
        started = time.perf_counter()
        smart = measure_sensitivities(
            student, teacher, lambda i: load_mixer(build_mixer(mla_config, i, "mla"), bank[i]["mla"]),
            plan.smart_tokens, args.batch_size, "cpu")
        smart["chosen"] = choose_layers(smart["sensitivity"], plan.n_mla)
        smart_record = {"smart": smart, "seconds": time.perf_counter() - started}
        work.write("smart", smart_record)
        del student
    smart, smart_s = smart_record["smart"], smart_record["seconds"]
    chosen = smart["chosen"]

    def types(mla):
        return ["mla" if i in mla else "mamba2" for i in range(n)]

    # (label, model, train tokens, train seconds); KD rows are trained (or loaded) one after the other
    rows = [("untrained hybrid (SMART layers)",
             hybridize(teacher, mla_layers=chosen, q_rank=ranks[0], kv_rank=ranks[1], rope_dim=ranks[2]), 0, 0.0),
            ("after ILD (SMART layers)", assemble(teacher, bank, types(chosen), ranks), ild_tokens, ild_s + smart_s)]
    curve: list[dict] = []
    for label, mla in placements(n, plan.n_mla, chosen).items():
        student, record = trained_row(f"kd-{label.replace(' ', '-').lower()}",
                                      lambda mla=mla: assemble(teacher, bank, types(mla), ranks),
                                      teacher, plan, args, stream, work, label == "SMART")
        curve = record["curve"] if label == "SMART" else curve
        rows.append((f"ILD + KD, {label} {mla}", student, ild_tokens + record["kd_tokens"],
                     ild_s + (smart_s if label == "SMART" else 0.0) + record["kd_seconds"]))
    half = ["attention" if i % 2 == 0 else "mamba2" for i in range(n)]
    student, record = trained_row("kd-half-attention", lambda: assemble(teacher, bank, half, ranks),
                                  teacher, plan, args, stream, work, False)
    rows.append(("ILD + KD, 50% attention (MambaInLlama-style)", student, ild_tokens + record["kd_tokens"],
                 ild_s / 2 + record["kd_seconds"]))  # only its Mamba2 mixers' half of the ILD
    small = (ranks[0], args.all_mla_kv_rank, args.all_mla_rope_dim)
    mla_bank, mla_s = ild_bank(teacher, plan.ild_tokens, small, ["mla"], args, work, "ild-all-mla")
    student, record = trained_row("kd-all-mla", lambda: assemble(teacher, mla_bank, ["mla"] * n, small),
                                  teacher, plan, args, stream, work, False)
    rows.append((f"ILD + KD, all-MLA r_kv {small[1]} d_rope {small[2]}", student, ild_tokens + record["kd_tokens"],
                 mla_s + record["kd_seconds"]))

    metrics = evaluate_all({label: model for label, model, _, _ in rows}, teacher, stream, args, work)
    # decode speed depends on the layer kinds' counts, not their places: measured once per architecture
    speeds = work.read("decode") or {}
    out = []
    for label, model, tokens, seconds in [("teacher", teacher, 0, 0.0), *rows]:
        kinds = getattr(model.config, "layer_types", None) or ["attention"] * n
        arch = ",".join(f"{t}:{kinds.count(t)}" for t in sorted(set(kinds)))
        if arch not in speeds:
            speeds[arch] = decode_speed(model, args.decode_context, args.decode_steps)
            work.write("decode", speeds)
        row = {"row": label, "kv_fraction": kv_cache_fraction(model) if is_hybrid(model) else 1.0, **metrics[label],
               "decode_tok_s": speeds[arch], "train_tokens": tokens, "train_seconds": round(seconds, 1),
               "layers": getattr(model.config, "layer_types", None)}
        print(json.dumps(row), flush=True)
        out.append(row)
    return out, curve, {"smart": smart, "plan": plan.summary(), "ild_seconds": ild_s, "smart_seconds": smart_s,
                        "all_mla_ild_seconds": mla_s, "decode_by_architecture": speeds}


def report(rows, curve, extra, args) -> list[str]:
    teacher_ppl = rows[0]["perplexity"]
    lines = [f"# Zebra-Llama distillation of {args.model}", "", "Protocol: evaluation/bench_distill.py "
             f"(r_kv {args.kv_rank}, d_rope {args.rope_dim}, seqlen {args.seqlen}, ILD {args.ild_tokens} tokens × {args.ild_epochs} epoch(s) at lr {args.ild_lr}, "
             f"KD {args.kd_tokens} tokens at lr {args.lr}, batch {args.batch_size}; perplexity @{args.eval_seqlen}, "
             f"first {args.windows} windows; decode after {args.decode_context} tokens; {args.threads} threads).", "",
             "| row | KV % | ppl | ppl ÷ teacher | KL | top-1 | decode tok/s | train tokens | train s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['row']} | {100 * r['kv_fraction']:.2f} | {r['perplexity']:.2f} | "
                     f"{r['perplexity'] / teacher_ppl:.2f} | {r['kl']:.4f} | {r['top1']:.3f} | "
                     f"{r['decode_tok_s']:.2f} | {r['train_tokens']} | {r['train_seconds']} |")
    smart = extra["smart"]
    lines += ["", f"SMART chose {smart['chosen']}; sensitivities (KL drop when the layer alone is MLA): "
              + ", ".join(f"{i}: {s:.4f}" for i, s in enumerate(smart["sensitivity"])), "",
              f"Perplexity against KD tokens (SMART's layers, first {args.curve_windows} windows):", "",
              "| KD tokens | ppl |", "|---|---|"]
    lines += [f"| {p['kd_tokens']} | {p['perplexity']:.2f} |" for p in curve]
    if len(curve) >= 3 and all(p["perplexity"] > 0 for p in curve[1:]):
        (x0, y0), (x1, y1) = [(math.log(p["kd_tokens"]), math.log(p["perplexity"])) for p in (curve[-2], curve[-1])]
        slope = (y1 - y0) / (x1 - x0) if x1 > x0 else 0.0
        goal = math.log(1.5 * teacher_ppl)
        if y1 <= goal:
            reach = f"; already within 1.5× the teacher's perplexity ({1.5 * teacher_ppl:.2f})"
        elif slope < 0:
            reach = (f"; at that rate 1.5× the teacher's perplexity ({1.5 * teacher_ppl:.2f}) needs about "
                     f"{math.exp(x1 + (goal - y1) / slope):.3g} KD tokens")
        else:
            reach = "; not falling: the curve gives no budget"
        lines += ["", f"Last segment: ppl ∝ tokens^{slope:.3f}{reach}"]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default="wikitext2")
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--ild-tokens", type=int, default=32768)
    parser.add_argument("--ild-epochs", type=int, default=2)
    parser.add_argument("--ild-lr", type=float, default=1e-3)
    parser.add_argument("--smart-tokens", type=int, default=4096)
    parser.add_argument("--kd-tokens", type=int, default=65536)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--n-mla", type=int, default=4)
    parser.add_argument("--kv-rank", type=int, default=112)
    parser.add_argument("--rope-dim", type=int, default=32)
    parser.add_argument("--all-mla-kv-rank", type=int, default=11)
    parser.add_argument("--all-mla-rope-dim", type=int, default=8)
    parser.add_argument("--eval-seqlen", type=int, default=2048)
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--decode-context", type=int, default=8192)
    parser.add_argument("--decode-steps", type=int, default=16)
    parser.add_argument("--curve-windows", type=int, default=8)
    parser.add_argument("--curve-points", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None)
    parser.add_argument("--work", default=None, help="keep every finished stage here; a rerun continues")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.time()
    rows, curve, extra = run(args)
    lines = report(rows, curve, extra, args) + ["", f"Wall time {time.time() - started:.0f} s."]
    print("\n".join(lines))
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")
        Path(args.out).with_suffix(".json").write_text(json.dumps({"rows": rows, "curve": curve, **extra}, indent=1,
                                                                  default=str))


if __name__ == "__main__":
    os.environ.setdefault("COMPRESS_PROGRESS", "0")
    main()
