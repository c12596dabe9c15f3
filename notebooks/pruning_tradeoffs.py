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
# # Pruning trade-offs: what does each pruned percent cost, and what does it buy?
#
# **Question.** SlimGPT (with its layer schedules: `log`, the paper's Incremental Pruning Ratio;
# `uniform`; `global`, allocated by OBS error, with bias compensation), FLAP, ShortGPT (whole layers)
# and two uncompensated baselines (`magnitude` and `wanda-sp`, on SlimGPT's uniform plan, from
# `evaluation/prune_baselines.py`), each at several ratios of the decoder's parameters: how does
# perplexity grow as parameters go, and how much faster does the pruned model prefill?
#
# Every point prunes a fresh copy of the model on the same calibration tokens (`compress.prune`,
# through the method registry), then measures perplexity on the same windows (`compress.evaluate`)
# and prefill tokens/s (a `prefill_tokens`-token prompt, batch 1, best of 2). Speeds on a shared CPU
# are noisy: read them as ratios to the dense model measured in the same run.
#
# The defaults run on the idle 2-core CPU in about 2.5 minutes (8 × 128 calibration tokens, perplexity
# over 2 windows of 256 tokens: the shape of the trade-off, not the last digit). The study at full size: `calib_samples=64, calib_seqlen=256`,
# `eval_seqlen=128, eval_windows=80` (SlimGPT's protocol, as `evaluation/results/prune-smollm2.md`).

# %% tags=["parameters"]
model: str = "smollm2-135m"  # an alias, a Hugging Face folder or a GGUF file
methods: list[str] = ["slimgpt-log", "slimgpt-uniform", "slimgpt-global", "flap", "shortgpt", "magnitude",
                      "wanda-sp"]
ratios: list[float] = [0.2, 0.4]  # fractions of the decoder layers' parameters to remove
gqa_unit: str = "query"  # SlimGPT/FLAP under grouped-query attention: query heads or whole KV groups
data: str = "wikitext2"  # calibration (train excerpt) and evaluation (test split) text
calib_samples: int = 8
calib_seqlen: int = 128
eval_seqlen: int = 256
eval_windows: int = 2
prefill_tokens: int = 128
threads: int = 0  # torch threads (0: torch's default, every core; 1 is faster on a CPU shared with other jobs)
out_dir: str = "results"  # the figure (PNG) and the numbers (JSON)

# %%
import study
from compress.errors import CompressError

settings = study.check_parameters(globals(), __annotations__, "pruning_tradeoffs")

# the registered methods and their options; magnitude and wanda-sp are the benchmark's baselines
VARIANTS = {
    "slimgpt-log": ("slimgpt", {"schedule": "log"}),
    "slimgpt-uniform": ("slimgpt", {"schedule": "uniform"}),
    "slimgpt-global": ("slimgpt", {"schedule": "global", "bias": True}),
    "flap": ("flap", {}),
    "shortgpt": ("shortgpt", {}),
}
BASELINES = ("magnitude", "wanda-sp")
unknown = [m for m in methods if m not in VARIANTS and m not in BASELINES]
if unknown:
    raise CompressError(f"pruning_tradeoffs: unknown method '{unknown[0]}' "
                        f"(methods: {', '.join([*VARIANTS, *BASELINES])})")
if not all(0 < r < 1 for r in ratios):
    raise CompressError(f"pruning_tradeoffs: every ratio must be in (0, 1), got {ratios}")

# %% [markdown]
# ## Setup: calibration tokens, the dense model's perplexity and speed

# %%
import copy
import time

import matplotlib.pyplot as plt
import torch
from transformers.utils import logging as hf_logging

import compress
from compress.data import calibration_tokens
from compress.metrics.cost import count_parameters, tokens_per_second
from compress.models import decoder_layers
from compress.plugin import LayerContext, build_method
from compress.walk import walk
from evaluation.prune_baselines import StructuredBaseline

hf_logging.disable_progress_bar()
if threads:
    torch.set_num_threads(threads)
started = time.perf_counter()
dense = compress.load(model)
tokenizer = dense.tokenizer
tokens = calibration_tokens(dense.model, tokenizer, data, calib_samples, calib_seqlen, seed=0)
protocol = dict(data=data, seqlen=eval_seqlen, windows=eval_windows, tokenizer=tokenizer)


def decoder_parameters(m) -> int:
    return sum(p.numel() for p in decoder_layers(m).parameters())


def measure(m) -> dict:
    ppl = compress.evaluate(m, **protocol)["perplexity"]
    prefill, _ = tokens_per_second(m, prefill_len=prefill_tokens, decode_steps=1, repeats=2)
    return {"perplexity": ppl, "parameters": count_parameters(m), "decoder_parameters": decoder_parameters(m),
            "prefill_tokens_per_s": prefill}


dense_row = {"method": "dense", "ratio": 0.0, **measure(dense.model), "prune_seconds": 0.0}
print(study.table([dense_row]))


# %% [markdown]
# ## Prune and measure, one method and ratio at a time

# %%
def prune_copy(name: str, ratio: float) -> torch.nn.Module:
    """A pruned copy of the dense model (the dense one is never touched)."""
    m = copy.deepcopy(dense.model)
    if name in VARIANTS:
        method, options = VARIANTS[name]
        unit = {} if method == "shortgpt" else {"gqa_unit": gqa_unit}
        compress.prune(m, method=method, tokens=tokens, device="cpu", ratio=ratio, **options, **unit)
        return m
    planner = build_method("slimgpt", {"ratio": ratio, "schedule": "uniform", "gqa_unit": gqa_unit})
    planner.prepare(m)  # the per-layer head and channel counts the baseline removes
    baseline = StructuredBaseline(name, planner)
    if name == "magnitude":  # data-free: no walk
        for index, layer in enumerate(decoder_layers(m)):
            for group in baseline.groups(layer, index):
                baseline.apply(LayerContext(layer, index, group, {}, torch.device("cpu")))
    else:
        walk(m, tokens, [baseline], device="cpu")
    return m


rows = [dense_row]
for ratio in ratios:
    for name in methods:
        t0 = time.perf_counter()
        pruned = prune_copy(name, ratio)
        seconds = time.perf_counter() - t0
        row = {"method": name, "ratio": ratio, **measure(pruned), "prune_seconds": round(seconds, 1)}
        row["decoder_removed"] = 1 - row["decoder_parameters"] / dense_row["decoder_parameters"]
        row["prefill_vs_dense"] = row["prefill_tokens_per_s"] / dense_row["prefill_tokens_per_s"]
        rows.append(row)
        del pruned
        print(study.table([row], ["method", "ratio", "decoder_removed", "perplexity", "prefill_vs_dense",
                                  "prune_seconds"]))

# %%
print(study.table(rows, ["method", "ratio", "decoder_removed", "parameters", "perplexity", "prefill_tokens_per_s",
                         "prefill_vs_dense", "prune_seconds"]))

# %% [markdown]
# ## Perplexity and prefill speed against parameters
#
# One line per method through its ratios; the star is the dense model.

# %%
fig, (ax_ppl, ax_speed) = plt.subplots(1, 2, figsize=(13, 4.5))
cmap = plt.get_cmap("tab10")
for i, name in enumerate(methods):
    points = sorted((r for r in rows if r["method"] == name), key=lambda r: r["parameters"])
    x = [r["parameters"] / 1e6 for r in points]
    style = dict(color=cmap(i % 10), marker="os^Dv<>P"[i % 8], label=name,
                 ls="--" if name in BASELINES else "-")
    ax_ppl.plot(x, [r["perplexity"] for r in points], **style)
    ax_speed.plot(x, [r["prefill_tokens_per_s"] for r in points], **style)
for ax, key in ((ax_ppl, "perplexity"), (ax_speed, "prefill_tokens_per_s")):
    ax.plot([dense_row["parameters"] / 1e6], [dense_row[key]], "k*", ms=14, label="dense")
    ax.set_xlabel("parameters (M)")
    ax.grid(True, which="both", alpha=0.3)
ax_ppl.set_yscale("log")
ax_ppl.set_ylabel(f"perplexity ({data} @{eval_seqlen} × {eval_windows} windows)")
ax_speed.set_ylabel(f"prefill tokens/s ({prefill_tokens}-token prompt, batch 1)")
ax_ppl.legend(fontsize=8)
fig.suptitle(f"{model}: structured pruning at ratios {', '.join(f'{r:.0%}' for r in ratios)}, "
             f"calibration {calib_samples} × {calib_seqlen}")
fig.tight_layout()
png = study.save_figure(fig, out_dir, "pruning_tradeoffs")
plt.show()

# %%
results = study.write_results(out_dir, "pruning_tradeoffs", {"parameters": settings, "rows": rows,
                                                             "seconds": round(time.perf_counter() - started, 1)})
print(f"wrote {png} and {results} in {time.perf_counter() - started:.0f} s")
