# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Quantization trade-offs: what does each bit cost?
#
# **Question.** Round-to-nearest (RTN) or GPTQ, at 2, 3, 4 and 8 bits and at several group sizes:
# how much perplexity, KL divergence and top-1 agreement (against the float model, on the same
# windows) does each choice cost, and how many bytes on disk does it save?
#
# Every configuration quantizes a fresh copy of the float model with `compress.quantize` (GPTQ on the same
# calibration tokens), is measured with `compress.evaluate(..., reference=float model)` and written
# with `compress.save` (compressed-tensors), so the bytes are those of a checkpoint that loads.
# *Bits per weight* counts the packed codes plus their scales, zero points and group indices over the
# number of quantized weights, read from the saved safetensors. Embeddings and `lm_head` stay float.
#
# The defaults run on the idle 2-core CPU in about 3.5 minutes (4 × 128 calibration tokens, perplexity
# over 2 windows of 256 tokens: a small protocol, good for the shape of the curves, not for the last
# digit). The study at full size: `calib_samples=128, calib_seqlen=512, eval_seqlen=2048,
# eval_windows=40` (the protocol of `evaluation/results/quantize-smollm2.md`).

# %% tags=["parameters"]
model: str = "smollm2-135m"  # an alias, a Hugging Face folder or a GGUF file
methods: list[str] = ["rtn", "gptq"]  # registered quantization methods
bits: list[int] = [2, 3, 4, 8]  # the bits sweep, at group_size
group_size: int = 64  # input columns per scale in the bits sweep (-1: one scale per output channel)
group_sizes: list[int] = [-1]  # more group sizes, tried at group_bits (e.g. [32, -1])
group_bits: int = 4
data: str = "wikitext2"  # calibration (train excerpt) and evaluation (test split) text
calib_samples: int = 4
calib_seqlen: int = 128
eval_seqlen: int = 256
eval_windows: int = 2
threads: int = 0  # torch threads (0: torch's default, every core; 1 is faster on a CPU shared with other jobs)
out_dir: str = "results"  # the figure (PNG) and the numbers (JSON)
work_dir: str | None = None  # where the checkpoints are written (None: a temporary folder, removed)

# %%
import study

settings = study.check_parameters(globals(), __annotations__, "quantization_tradeoffs")

# %% [markdown]
# ## Setup: the float model, the calibration tokens, the float perplexity

# %%
import copy
import shutil
import time

import matplotlib.pyplot as plt
import torch
from safetensors import safe_open
from transformers.utils import logging as hf_logging

import compress
from compress.data import calibration_tokens
from compress.metrics.cost import bytes_on_disk

hf_logging.disable_progress_bar()
if threads:
    torch.set_num_threads(threads)
started = time.perf_counter()
reference = compress.load(model)
tokens = calibration_tokens(reference.model, reference.tokenizer, data, calib_samples, calib_seqlen, seed=0)
protocol = dict(data=data, seqlen=eval_seqlen, windows=eval_windows)
dense = compress.evaluate(reference, **protocol)
float_bytes = bytes_on_disk(reference.path)
print(f"float: perplexity {dense['perplexity']:.3f} on {dense['windows']} windows of {eval_seqlen} tokens, "
      f"{float_bytes / 1e6:.1f} MB on disk")

# %%
QUANTIZED = ("weight_packed", "weight_scale", "weight_zero_point", "weight_g_idx")


def bits_per_weight(folder) -> float:
    """Bits on disk per quantized weight: packed codes + scales + zero points + group indices, over the
    weights they stand for (each module's ``weight_shape``)."""
    stored, weights = 0, 0
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            for key in f.keys():
                kind = key.rpartition(".")[2]
                if kind in QUANTIZED:
                    t = f.get_tensor(key)
                    stored += t.numel() * t.element_size()
                elif kind == "weight_shape":
                    weights += int(torch.prod(f.get_tensor(key).long()))
    return 8 * stored / weights


# %% [markdown]
# ## Quantize, measure, save: one configuration at a time

# %%
configs = [(m, b, group_size) for m in methods for b in bits]
configs += [(m, group_bits, g) for m in methods for g in group_sizes if (m, group_bits, g) not in configs]
rows = []
work = study.work_folder(work_dir)  # a temporary folder unless work_dir is given
for method, b, g in configs:
    t0 = time.perf_counter()
    quantized = copy.deepcopy(reference)  # a fresh float copy (the reference is never touched)
    compress.quantize(quantized, method=method, bits=b, group_size=g, tokens=tokens, device="cpu")
    seconds = time.perf_counter() - t0
    measured = compress.evaluate(quantized, **protocol, reference=reference)
    folder = compress.save(quantized, work / f"{method}-w{b}-g{g}")
    rows.append({"method": method, "bits": b, "group_size": g, "perplexity": measured["perplexity"],
                 "kl_divergence": measured["kl_divergence"], "top1_agreement": measured["top1_agreement"],
                 "bytes_on_disk": bytes_on_disk(folder), "bits_per_weight": bits_per_weight(folder),
                 "folder": str(folder), "quantize_seconds": round(seconds, 1)})
    if work_dir is None:
        shutil.rmtree(folder)  # a few hundred MB each; the numbers are kept
    del quantized
    print(study.table(rows[-1:], ["method", "bits", "group_size", "perplexity", "kl_divergence",
                                  "top1_agreement", "bits_per_weight", "quantize_seconds"]))
study.remove_work_folder(work, work_dir)

# %%
print(study.table(rows, ["method", "bits", "group_size", "bits_per_weight", "perplexity", "kl_divergence",
                         "top1_agreement", "bytes_on_disk"]))

# %% [markdown]
# ## Perplexity, KL and top-1 agreement against bits per weight
#
# Lines: the bits sweep at `group_size`; open markers: the other group sizes at `group_bits`
# (labelled with their group size, `ch` = one scale per output channel). The dashed line is the float
# model (32 bits per weight on disk here).

# %%
fig, axes = plt.subplots(1, 3, figsize=(15, 4.3))
metrics = [("perplexity", "perplexity", True), ("kl_divergence", "KL(float ‖ quantized), nats", True),
           ("top1_agreement", "top-1 agreement with float", False)]
colors = {m: plt.get_cmap("tab10")(i) for i, m in enumerate(methods)}
for ax, (key, label, log) in zip(axes, metrics):
    for method in methods:
        sweep = sorted((r for r in rows if r["method"] == method and r["group_size"] == group_size),
                       key=lambda r: r["bits_per_weight"])
        ax.plot([r["bits_per_weight"] for r in sweep], [max(r[key], 1e-6) for r in sweep], "o-",
                color=colors[method], label=f"{method}, group {group_size if group_size > 0 else 'ch'}")
        for r in rows:
            if r["method"] == method and r["group_size"] != group_size:
                ax.plot(r["bits_per_weight"], max(r[key], 1e-6), "o", mfc="none", color=colors[method], ms=9)
                ax.annotate(f"g{r['group_size']}" if r["group_size"] > 0 else "ch",
                            (r["bits_per_weight"], max(r[key], 1e-6)), textcoords="offset points",
                            xytext=(5, 5), fontsize=8, color=colors[method])
    if key == "perplexity":
        ax.axhline(dense["perplexity"], color="gray", ls="--", label="float")
    elif key == "top1_agreement":
        ax.axhline(1.0, color="gray", ls="--", label="float")
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("bits per quantized weight (scales included)")
    ax.set_ylabel(label)
    ax.grid(True, which="both", alpha=0.3)
axes[0].legend(fontsize=8)
fig.suptitle(f"{model}: RTN vs GPTQ — perplexity on {data} @{eval_seqlen} × {eval_windows} windows, "
             f"calibration {calib_samples} × {calib_seqlen}")
fig.tight_layout()
png = study.save_figure(fig, out_dir, "quantization_tradeoffs")
plt.show()

# %%
results = study.write_results(out_dir, "quantization_tradeoffs", {
    "parameters": settings, "float": {"perplexity": dense["perplexity"], "bytes_on_disk": float_bytes},
    "rows": rows, "seconds": round(time.perf_counter() - started, 1)})
print(f"wrote {png} and {results} in {time.perf_counter() - started:.0f} s")
