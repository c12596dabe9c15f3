"""Benchmark: Llama-3-8B-shaped decoder layers (evaluation/scale_model.py): time and memory per layer.

Protocol (one process; the synthetic model is built once, seeded, and every method gets fresh copies
of its pristine decoder layers):

* model: ``--shape`` llama3-8b (hidden 4096, 32 heads in 8 KV groups, head_dim 128, FFN 14336,
  vocab 128256) with ``--layers`` decoder layers, random weights (seed 0), ``--dtype``; the
  embedding is tied to the lm_head unless ``--untied`` (the walk reads only the embedding);
* calibration: ``--samples`` × ``--seqlen`` uniformly random token ids (seed 0), ``--batch-size``
  samples per batch (the walk does not look at where tokens come from); ``--recipe-sizes`` uses each
  method's calibration size from recipes/llama3-8b-*.yaml instead;
* rows: ``empty`` (the walk, no method), ``gptq`` (W4 g128 sym act-order, sequential, staged),
  ``slimgpt`` (20 %, log schedule, query heads, float64 OBS), ``flap`` (20 %, gqa query, bias),
  ``ild`` (issue 14 is not built: the per-layer cost of a layer-wise distillation of ONE hybrid layer,
  layer 0, for each of MLA and Mamba2: teacher outputs on the cached inputs, the mixer built from the
  layer's attention with compress.hybrid.build, then ``--ild-steps`` Adam steps of the MSE between the
  new layer's output and the teacher's, one cached batch per step, only the mixer trained);
* time: per layer, split into forward (everything else: the layer's forward passes, transfers),
  statistics (HessianAccumulator.add_batch) and solver (the method's apply / finish; for ILD the
  mixer construction, backward and optimizer steps), timed by wrapping those functions from here
  (the core is not instrumented; on CUDA each timer synchronizes); capture (layer-0 inputs) apart;
* memory: peak host RSS over the walk (Linux VmHWM, reset through /proc/self/clear_refs) minus RSS
  before it, and on CUDA torch.cuda.max_memory_allocated minus the allocation before it, each against
  the formula of :mod:`evaluation.scale_formulas` (ratio measured ÷ formula, goal within 1.2×);
* extrapolation: seconds per layer × 32 layers, scaled linearly in tokens to the recipes' calibration
  sizes (the solver part is not scaled: it does not depend on the token count) — an extrapolation.

    python -m evaluation.bench_scale --samples 2 --seqlen 2048 --out evaluation/results/scale-cpu.md
    python -m evaluation.bench_scale --device cuda --dtype bfloat16 --recipe-sizes --untied
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import platform
import time
from pathlib import Path

import psutil
import torch

from compress.plugin import build_method
from compress.progress import set_progress
from compress.walk import resolve_device
from evaluation import scale_formulas as formulas
from evaluation.scale_model import model_parameters, scale_config, scale_model

GiB, MiB = 1024 ** 3, 1024 ** 2
METHODS = ("empty", "gptq", "slimgpt", "flap", "ild")
OPTIONS = {"gptq": {"bits": 4, "group_size": 128, "sym": True, "act_order": True, "block_size": 128,
                    "damp": 0.01, "sequential": True},
           "slimgpt": {"ratio": 0.2, "schedule": "log", "min_scale": 0.25, "gqa_unit": "query"},
           "flap": {"ratio": 0.2, "gqa_unit": "query", "bias": True}}
# calibration (samples, seqlen) of recipes/llama3-8b-*.yaml; ILD has no recipe yet: GPTQ's size
RECIPE_SIZES = {"empty": (128, 2048), "gptq": (128, 2048), "slimgpt": (256, 2048), "flap": (1024, 128),
                "ild": (128, 2048)}


def _hwm() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return psutil.Process().memory_info().rss


class Meter:
    """Timers wrapped around the walk's phases, and the memory peaks of one run."""

    def __init__(self, device: torch.device):
        self.device = device
        self.totals = {"capture": 0.0, "statistics": 0.0, "solver": 0.0}
        self.layers: list[dict] = []
        self._undo = []

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def timed(self, key, fn):
        def wrapper(*args, **kwargs):
            self.sync()
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.sync()
                self.totals[key] += time.perf_counter() - start
        return wrapper

    def patch(self, owner, name, wrapper_of):
        original = getattr(owner, name)
        setattr(owner, name, wrapper_of(original))
        self._undo.append((owner, name, original, name in vars(owner)))

    def per_layer(self, fn):
        def wrapper(*args, **kwargs):
            before = dict(self.totals)
            self.sync()
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            self.sync()
            total = time.perf_counter() - start
            stats = self.totals["statistics"] - before["statistics"]
            solver = self.totals["solver"] - before["solver"]
            self.layers.append({"total": total, "statistics": stats, "solver": solver,
                                "forward": total - stats - solver})
            return out
        return wrapper

    def restore(self):
        for owner, name, original, own in reversed(self._undo):
            if own:
                setattr(owner, name, original)
            else:
                delattr(owner, name)
        self._undo.clear()

    def __enter__(self):
        gc.collect()
        self.sync()
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        self.rss0 = psutil.Process().memory_info().rss
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.dev0 = torch.cuda.memory_allocated()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.sync()
        self.seconds = time.perf_counter() - self.start
        self.host_peak = _hwm() - self.rss0
        self.device_peak = torch.cuda.max_memory_allocated() - self.dev0 if self.device.type == "cuda" else 0
        self.restore()


def run_walk_method(name, model, tokens, device, batch_size, meter: Meter):
    import compress.walk as walk_module
    from compress.stats import HessianAccumulator

    methods = []
    if name != "empty":
        method = build_method(name, OPTIONS[name])
        method.prepare(model)
        meter.patch(method, "apply", lambda f: meter.timed("solver", f))
        meter.patch(method, "finish", lambda f: meter.timed("solver", f))
        methods.append(method)
    meter.patch(walk_module, "capture_inputs", lambda f: meter.timed("capture", f))
    meter.patch(HessianAccumulator, "add_batch", lambda f: meter.timed("statistics", f))
    meter.patch(walk_module._LayerStep, "run", meter.per_layer)
    with meter:
        walk_module.walk(model, tokens, methods, device=device, batch_size=batch_size)
    if methods and meter.layers:  # FLAP prunes in finish(), after the last layer: spread over the layers
        tail = meter.totals["solver"] - sum(r["solver"] for r in meter.layers)
        for r in meter.layers:
            r["solver"] += tail / len(meter.layers)
            r["total"] += tail / len(meter.layers)


def run_ild(model, tokens, device, batch_size, steps, meter: Meter):
    """ILD of one hybrid layer (layer 0), for MLA and for Mamba2; see the module docstring."""
    import compress.walk as walk_module
    from compress.hybrid.build import hybrid_config, mla_from_attention, mamba2_from_attention, parent_shape

    shape = parent_shape(model)
    q_rank, kv_rank, rope = shape.default_ranks()
    config = hybrid_config(model.config, shape, ["mla"] + ["mamba2"] * (shape.layers - 1), q_rank, kv_rank, rope)
    meter.patch(walk_module, "capture_inputs", lambda f: meter.timed("capture", f))
    with meter:
        inputs = walk_module.capture_inputs(model, tokens, device, batch_size)
        layer = model.model.layers[0].to(device)
        meter.sync()
        start = time.perf_counter()
        teacher = walk_module.layer_outputs(layer, inputs, device)
        meter.sync()
        teacher_s = time.perf_counter() - start
        for kind, build in (("mla", mla_from_attention), ("mamba2", mamba2_from_attention)):
            fwd = solver = 0.0
            start = time.perf_counter()
            student = copy.deepcopy(layer)
            with torch.no_grad():
                student.self_attn = build(layer.self_attn, config, 0)
            for p in student.parameters():
                p.requires_grad_(False)
            params = list(student.self_attn.parameters())
            for p in params:
                p.requires_grad_(True)
            optimizer = torch.optim.Adam(params, lr=1e-5)
            meter.sync()
            solver += time.perf_counter() - start
            for step in range(steps):
                i = step % len(inputs.hidden)
                kwargs = walk_module.to_device({k: v for k, v in inputs.per_layer[0][i].items()
                                                if k != "attention_mask"}, device)
                start = time.perf_counter()
                out = student(inputs.hidden[i].to(device), **kwargs)
                out = out[0] if isinstance(out, tuple) else out
                loss = torch.nn.functional.mse_loss(out.float(), teacher[i].to(device).float())
                meter.sync()
                mid = time.perf_counter()
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                meter.sync()
                fwd, solver = fwd + mid - start, solver + time.perf_counter() - mid
            del student, optimizer, params, out, loss
            meter.layers.append({"kind": kind, "forward": teacher_s + fwd, "statistics": 0.0, "solver": solver,
                                 "total": teacher_s + fwd + solver, "loss": None})
        model.model.layers[0] = layer.to("cpu")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shape", default="llama3-8b", choices=("llama3-8b", "tiny"))
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--untied", action="store_true", help="a separate lm_head, as the real model")
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--recipe-sizes", action="store_true", help="each method at its recipe's calibration size")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--ild-steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--out", default=None, help="write the markdown table here")
    parser.add_argument("--json", default=None, help="write the rows as JSON here")
    parser.add_argument("--from-json", default=None, help="only render the rows a run saved (--json) again")
    parser.add_argument("--save-model", default=None, help="also save the synthetic model with smollm2-135m's "
                                                           "tokenizer here (the dry run's smoke model)")
    return parser.parse_args(argv)


def rerender(args) -> None:
    """Render saved rows (``--from-json``) again, with the formulas as they are now."""
    rows = json.loads(Path(args.from_json).read_text())
    meta = rows[0].get("meta", {})
    for key in ("shape", "layers", "dtype", "untied", "batch_size", "ild_steps"):
        setattr(args, key, meta.get(key, getattr(args, key)))
    device, dtype = torch.device(meta.get("device", "cpu")), getattr(torch, args.dtype)
    config = scale_config(args.shape, args.layers, not args.untied)
    for row in rows:
        sizes = formulas.Sizes.of(config, row["samples"], row["seqlen"], row["batch"], dtype, device.type,
                                  model_parameters(config, tie=not args.untied))
        row["host_formula"] = formulas.host_formula(row["method"], sizes)
        row["device_formula"] = formulas.device_formula(row["method"], sizes)
        row["extrapolated_32"] = formulas.extrapolate(row, sizes, RECIPE_SIZES[row["method"]], 32)
    table = render(args, device, dtype, rows, meta.get("build_s", 0.0), config, meta)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.from_json:
        return rerender(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    set_progress(False)
    device = resolve_device(args.device)
    dtype = getattr(torch, args.dtype)
    start = time.perf_counter()
    model = scale_model(args.shape, args.layers, dtype, seed=0, tie=not args.untied)
    build_s = time.perf_counter() - start
    pristine = copy.deepcopy(model.model.layers)
    if args.save_model:
        from transformers import AutoTokenizer
        from compress.models import resolve_model_path

        model.save_pretrained(args.save_model)
        AutoTokenizer.from_pretrained(str(resolve_model_path("smollm2-135m"))).save_pretrained(args.save_model)
    config = model.config
    rows = []
    for name in [m for m in args.methods.split(",") if m]:
        samples, seqlen = RECIPE_SIZES[name] if args.recipe_sizes else (args.samples, args.seqlen)
        tokens = torch.randint(0, config.vocab_size, (samples, seqlen), generator=torch.Generator().manual_seed(0))
        model.model.layers = copy.deepcopy(pristine)
        meter = Meter(device)
        if name == "ild":
            run_ild(model, tokens, device, args.batch_size, args.ild_steps, meter)
        else:
            run_walk_method(name, model, tokens, device, args.batch_size, meter)
        model.model.layers = None
        gc.collect()
        sizes = formulas.Sizes.of(config, samples, seqlen, args.batch_size, dtype, device.type,
                                  model_parameters(config, tie=not args.untied))
        host_f, dev_f = formulas.host_formula(name, sizes), formulas.device_formula(name, sizes)
        row = {"method": name, "samples": samples, "seqlen": seqlen, "batch": args.batch_size,
               "seconds": meter.seconds, "capture": meter.totals["capture"], "layers": meter.layers,
               "host_peak": meter.host_peak, "host_formula": host_f, "device_peak": meter.device_peak,
               "device_formula": dev_f, "ild_steps": args.ild_steps if name == "ild" else None,
               "meta": {"shape": args.shape, "layers": args.layers, "dtype": args.dtype, "untied": args.untied,
                        "batch_size": args.batch_size, "ild_steps": args.ild_steps, "device": device.type,
                        "build_s": build_s, "machine": machine_line(device)}}
        row["extrapolated_32"] = formulas.extrapolate(row, sizes, RECIPE_SIZES[name], 32)
        rows.append(row)
        print(f"{name}: {meter.seconds:.1f} s, host peak {meter.host_peak / GiB:.2f} GiB "
              f"(formula {host_f['total'] / GiB:.2f})" + (f", device peak {meter.device_peak / GiB:.2f} GiB "
                                                          f"(formula {dev_f['total'] / GiB:.2f})" if dev_f else ""),
              flush=True)
        table = render(args, device, dtype, rows, build_s, config)  # rewritten after every method
        for path, text in ((args.out, table), (args.json, json.dumps(rows, indent=1, default=str))):
            if path:
                Path(path).parent.mkdir(parents=True, exist_ok=True)
                Path(path).write_text(text + "\n")
    print(table)
    return rows


def machine_line(device) -> str:
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    gpu = f", {torch.cuda.get_device_name()}" if device.type == "cuda" else ""
    load = " / ".join(f"{x:.2f}" for x in psutil.getloadavg())
    return (f"{date}. Machine: {platform.machine()}, {psutil.cpu_count()} CPUs, "
            f"{psutil.virtual_memory().total / GiB:.0f} GiB{gpu}; torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads; load average (1/5/15 min) when the row ended {load}")


def render(args, device, dtype, rows, build_s, config, meta=None) -> str:
    machine = (meta or {}).get("machine") or machine_line(device)
    lines = [f"# Llama-3-8B-shaped layers ({args.shape}, {args.layers} layers, {args.dtype}) on {device.type}", "",
             f"{machine}. Model built in {build_s:.0f} s (hidden {config.hidden_size}, heads "
             f"{config.num_attention_heads}/{config.num_key_value_heads}, FFN {config.intermediate_size}, vocab "
             f"{config.vocab_size}, {'untied' if args.untied else 'tied'} embeddings). Batch {args.batch_size} "
             f"sample(s); ILD: {args.ild_steps} steps per mixer kind, on layer 0 only.", "",
             "| method | calibration | layer | s / layer | forward | statistics | solver | capture s |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        for i, layer in enumerate(row["layers"]):
            label = layer.get("kind", i)
            t = [f"{layer[k]:.{1 if layer['total'] >= 10 else 3}f}" for k in ("total", "forward", "statistics", "solver")]
            lines.append(f"| {row['method']} | {row['samples']} × {row['seqlen']} | {label} | {' | '.join(t)} | "
                         f"{row['capture']:.2f} |")
    lines += ["", "Peak memory over each run against its formula (the terms are in the results file's notes):", "",
              "| method | host peak GiB | host formula GiB | ratio | device peak GiB | device formula GiB | ratio |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        hf, df = row["host_formula"]["total"], (row["device_formula"] or {}).get("total", 0)
        dev = (f"{row['device_peak'] / GiB:.2f} | {df / GiB:.2f} | {row['device_peak'] / df:.2f}" if df
               else "– | – | –")
        lines.append(f"| {row['method']} | {row['host_peak'] / GiB:.2f} | {hf / GiB:.2f} | "
                     f"{row['host_peak'] / hf:.2f} | {dev} |")
    lines += ["", "Formula terms (GiB):", ""]
    for row in rows:
        terms = ", ".join(f"{k} {v / GiB:.3f}" for k, v in row["host_formula"].items() if k != "total")
        lines.append(f"* {row['method']} host: {terms}")
        if row["device_formula"]:
            terms = ", ".join(f"{k} {v / GiB:.3f}" for k, v in row["device_formula"].items() if k != "total")
            lines.append(f"* {row['method']} device: {terms}")
    lines += ["", "Extrapolation (not measured) to 32 layers at the recipes' calibration sizes: the mean seconds "
              "per layer, forward and statistics scaled linearly in tokens, solver as measured:", "",
              "| method | recipe calibration | s / layer | 32 layers, minutes |", "|---|---|---:|---:|"]
    for row in rows:
        e = row["extrapolated_32"]
        lines.append(f"| {row['method']} | {e['samples']} × {e['seqlen']} | {e['per_layer']:.1f} | "
                     f"{e['minutes']:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
