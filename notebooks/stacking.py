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
# # Stacking: prune then quantize in one walk, against either alone at matched bytes
#
# **Question.** At the same bytes on disk, is it better to prune and quantize (SlimGPT removes
# `ratio` of the decoder's parameters, then GPTQ quantizes what is left to `bits`, both in one layer
# walk), or to quantize alone to fewer bits? Removing 25 % of the weights and storing the rest at 4 bits
# costs about what 3-bit weights cost (0.75 × 4 = 3 bits per original weight, scales aside), so the
# stacked model is matched against GPTQ at `matched_bits`; pruning alone and quantizing alone at `bits`
# show what each step costs on its own.
#
# Each model is one job through the recipe pipeline (`compress.recipe.parse_recipe` and
# `compress.pipeline.run_job`, what `compress run` does): calibration, the stages (consecutive
# layer-wise stages share one walk), export, and perplexity and fidelity (KL, top-1 agreement against
# the float model) recorded in each folder's `compress.json`. The table and the second plot are
# `compress compare` on those folders (`compress.compare.compare_outputs`).
#
# The defaults run on the idle 2-core CPU in about 2 minutes (8 × 128 calibration tokens, 2 windows of
# 256 tokens). The study at full size: `calib_samples=64, calib_seqlen=256, eval_seqlen=2048,
# eval_windows=40` (as `recipes/smollm2-135m-slimgpt20-gptq-w4g64.yaml`).

# %% tags=["parameters"]
model: str = "smollm2-135m"  # an alias, a Hugging Face folder or a GGUF file
ratio: float = 0.25  # SlimGPT: fraction of the decoder layers' parameters removed
schedule: str = "log"  # SlimGPT's per-layer schedule
bits: int = 4  # GPTQ bits after pruning, and of "quantize alone"
matched_bits: int = 3  # GPTQ bits of the model matched to the stacked one's bytes
group_size: int = 64  # GPTQ group size (kept FFN widths are rounded to a multiple of it)
data: str = "wikitext2"  # calibration (train excerpt) and evaluation (test split) text
calib_samples: int = 8
calib_seqlen: int = 128
eval_seqlen: int = 256
eval_windows: int = 2
threads: int = 0  # torch threads (0: torch's default, every core; 1 is faster on a CPU shared with other jobs)
out_dir: str = "results"  # the figures (PNG) and the numbers (JSON)
work_dir: str | None = None  # where the four output folders are written (None: a temporary folder, removed)

# %%
import study
from compress.errors import CompressError

settings = study.check_parameters(globals(), __annotations__, "stacking")
if not 0 < ratio < 1:
    raise CompressError(f"stacking: ratio must be in (0, 1), got {ratio}")

# %% [markdown]
# ## The four jobs, as recipes

# %%
import time

import matplotlib.pyplot as plt
import torch
import yaml
from transformers.utils import logging as hf_logging

from compress.compare import compare_outputs
from compress.metrics.cost import bytes_on_disk
from compress.models import resolve_model_path
from compress.pipeline import run_job
from compress.recipe import parse_recipe

hf_logging.disable_progress_bar()
if threads:
    torch.set_num_threads(threads)
started = time.perf_counter()
prune = {"method": "slimgpt", "options": {"ratio": ratio, "schedule": schedule,
                                          "ffn_multiple": group_size if group_size > 0 else 1}}


def gptq(b: int) -> dict:
    return {"method": "gptq", "options": {"bits": b, "group_size": group_size}}


def recipe(stages: list[dict]) -> str:
    return yaml.safe_dump({
        "model": model, "device": "cpu", "stages": stages,
        "data": {"source": data, "samples": calib_samples, "seqlen": calib_seqlen, "seed": 0},
        "eval": {"perplexity": {"data": data, "seqlen": eval_seqlen, "windows": eval_windows},
                 "fidelity": {"reference": model, "data": data, "seqlen": eval_seqlen, "windows": eval_windows}},
    }, sort_keys=False)


jobs = {f"slimgpt-{ratio:g}": [prune], f"gptq-w{bits}": [gptq(bits)], f"gptq-w{matched_bits}": [gptq(matched_bits)],
        f"slimgpt-{ratio:g}+gptq-w{bits}": [prune, gptq(bits)]}
print(recipe(jobs[f"slimgpt-{ratio:g}+gptq-w{bits}"]))

# %% [markdown]
# ## Run them

# %%
rows = []
work = study.work_folder(work_dir)  # removed at the end when temporary (compare reads the folders first)
folders = []
for name, stages in jobs.items():
    t0 = time.perf_counter()
    done = run_job(parse_recipe(recipe(stages), f"<{name}>"), str(work / name))
    m = done.metrics
    fidelity = m["fidelity"]
    dense_parameters = done.parameters[0]
    rows.append({"model": name, "walks": done.walks, "parameters": done.parameters[1],
                 "bytes_on_disk": bytes_on_disk(done.folder), "perplexity": m["perplexity"][0]["perplexity"],
                 "kl_divergence": fidelity["kl_divergence"], "top1_agreement": fidelity["top1_agreement"],
                 "seconds": round(time.perf_counter() - t0, 1)})
    folders.append(done.folder)
    print(study.table(rows[-1:]))

# %% [markdown]
# ## The float model on the same protocol

# %%
import compress

float_model = compress.load(model)
float_row = {"model": "float", "walks": 0, "parameters": dense_parameters,
             "bytes_on_disk": bytes_on_disk(resolve_model_path(model)),
             "perplexity": compress.evaluate(float_model, data=data, seqlen=eval_seqlen,
                                             windows=eval_windows)["perplexity"],
             "kl_divergence": 0.0, "top1_agreement": 1.0, "seconds": 0.0}
del float_model
print(study.table([float_row, *rows], ["model", "walks", "parameters", "bytes_on_disk", "perplexity", "kl_divergence",
                                       "top1_agreement", "seconds"]))
stacked, matched = rows[3], rows[2]
print(f"stacked / matched bytes on disk: {stacked['bytes_on_disk'] / matched['bytes_on_disk']:.3f}; "
      f"perplexity {stacked['perplexity']:.2f} (stacked) vs {matched['perplexity']:.2f} "
      f"(GPTQ {matched_bits} bits alone)")

# %% [markdown]
# ## Perplexity and KL against bytes on disk

# %%
fig, (ax_ppl, ax_kl) = plt.subplots(1, 2, figsize=(13, 4.5))
colors = {name: plt.get_cmap("tab10")(i) for i, name in enumerate(jobs)}
for ax, key, label in ((ax_ppl, "perplexity", f"perplexity ({data} @{eval_seqlen} × {eval_windows} windows)"),
                       (ax_kl, "kl_divergence", "KL(float ‖ model), nats")):
    for r in rows:
        ax.plot(r["bytes_on_disk"] / 1e6, r[key], "o", ms=10, color=colors[r["model"]], label=r["model"])
        ax.annotate(r["model"], (r["bytes_on_disk"] / 1e6, r[key]), textcoords="offset points", xytext=(6, 5),
                    fontsize=8)
    ax.annotate("", xy=(stacked["bytes_on_disk"] / 1e6, stacked[key]),
                xytext=(matched["bytes_on_disk"] / 1e6, matched[key]),
                arrowprops=dict(arrowstyle="<->", color="gray", ls=":"))
    ax.set_xlabel("size on disk (MB)")
    ax.set_ylabel(label)
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
ax_ppl.axhline(float_row["perplexity"], color="gray", ls="--", label=f"float ({float_row['bytes_on_disk'] / 1e6:.0f} MB)")
ax_ppl.legend(fontsize=8)
fig.suptitle(f"{model}: SlimGPT {ratio:.0%} + GPTQ W{bits} in one walk vs either alone, and vs W{matched_bits} "
             f"at matched bytes (group {group_size})")
fig.tight_layout()
png = study.save_figure(fig, out_dir, "stacking")
plt.show()

# %% [markdown]
# ## The same folders through `compress compare`
#
# It reads what each job recorded in `compress.json` (the protocols are the same here, so nothing is
# flagged) and draws perplexity against size.

# %%
comparison = compare_outputs(folders, plot_path=study.folder(out_dir) / "stacking_compare.png")
print(study.table([dict(zip(comparison.HEADERS, row)) for row in comparison.table()]))
print("\n".join(comparison.warnings) or "protocols: all the same")

# %%
results = study.write_results(out_dir, "stacking", {
    "parameters": settings, "float": float_row, "rows": rows, "compare": comparison.as_dict(),
    "seconds": round(time.perf_counter() - started, 1)})
study.remove_work_folder(work, work_dir)
print(f"wrote {png} and {results} in {time.perf_counter() - started:.0f} s")
