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
# # Search: is a searched sub-network better than a pruned one of the same size?
#
# **Question.** LLaMA-NAS (`compress search`) searches which layers to keep and how wide each one's
# attention and FFN stay, for the Pareto front of KL to the parent against decoder parameters. At the
# same size, do its sub-networks beat what SlimGPT, FLAP and ShortGPT prune, and does SlimGPT's
# sequential OBS compensation of the searched widths do better than the search's own one-shot refit?
#
# A small search runs on the calibration tokens (`compress.search.Search`); every method then prunes a
# fresh copy of the model on the same tokens, and each pruned model is scored by the same evaluator as
# the search's candidates (KL to the parent on the calibration tokens, `--compare` in the CLI), so the
# front and the points are on one scale. Then a front member at `budget` is exported
# as the search scored it (its kept o_proj / down_proj columns refit by OBS to the parent's outputs) and
# re-derived by SlimGPT's sequential OBS walk at the searched widths, and its held-out perplexity
# compared with the others'.
#
# The defaults run on the idle 2-core CPU in about 2 minutes (KL on 2 × 256 calibration tokens, the
# profiling walk on 8 × 256, population 6 for 2 generations, 4 refinement evaluations per budget). The study
# at full size: `calib_samples=4, calib_seqlen=512, obs_samples=32, population=16, generations=8, refine=24`
# (the CLI's defaults,
# `evaluation/results/search-smollm2.md`).

# %% tags=["parameters"]
model: str = "smollm2-135m"  # an alias, a Hugging Face folder or a GGUF file
budget: float = 0.7  # the size compared: a fraction of the parent's decoder parameters
space: str = "full"  # llama-nas (depth, FFN width) or full (also attention width)
population: int = 6
generations: int = 2
refine: int = 4  # then evaluations per budget around its best candidate (the CLI's default: 24)
ffn_step: int = 64
data: str = "wikitext2"  # calibration (train excerpt) and evaluation (test split) text
calib_samples: int = 2  # the KL's tokens (the CLI's default: 4 × 512)
calib_seqlen: int = 256
obs_samples: int = 8  # the profiling walk's tokens, for the candidates' OBS refit (the CLI's: 32 × 256)
obs_seqlen: int = 256
eval_seqlen: int = 256
eval_windows: int = 2
compensate_samples: int = 16  # SlimGPT's calibration of the compensated export (the CLI's default: 32 × 256)
compensate_seqlen: int = 128
threads: int = 0  # torch threads (0: torch's default, every core; 1 is faster on a CPU shared with other jobs)
out_dir: str = "results"  # the figure (PNG) and the numbers (JSON)
work_dir: str | None = None  # where the search folder and exported models go (None: a temporary folder)

# %%
import study
from compress.errors import CompressError

settings = study.check_parameters(globals(), __annotations__, "search")
if not 0 < budget < 1:
    raise CompressError(f"search: budget must be in (0, 1), got {budget}")

# %% [markdown]
# ## The search

# %%
import copy
import time

import matplotlib.pyplot as plt
import torch
from transformers.utils import logging as hf_logging

import compress
from compress.search.export import export_subnet
from compress.search.run import Search, SearchConfig

hf_logging.disable_progress_bar()
if threads:
    torch.set_num_threads(threads)
started = time.perf_counter()
work = study.work_folder(work_dir)
budgets = sorted({round(budget - 0.15, 2), budget, round(min(budget + 0.15, 0.95), 2)})
config = SearchConfig(space=space, budgets=budgets, population=population, generations=generations,
                      refine=refine, ffn_step=ffn_step, data=data, samples=calib_samples, seqlen=calib_seqlen,
                      obs_samples=obs_samples, obs_seqlen=obs_seqlen)
search = Search(model, work / "run", config, device="cpu")
record = search.run()
front = record["front"]
print(study.table(front, ["pick", "params", "kl", "ppl", "depth", "milp_budget"]))

# %% [markdown]
# ## The pruning methods at the same size, scored like the candidates

# %%
from compress.data import calibration_tokens
from compress.search.objectives import Evaluator
from compress.search.space import SearchSpace
from compress.search.subnet import reorder

parent = compress.load(model)
tokens = calibration_tokens(parent.model, parent.tokenizer, data, calib_samples, calib_seqlen, seed=0)
scorer_model = copy.deepcopy(parent.model)
scorer_space = SearchSpace(**record["space"])
evaluator = Evaluator(scorer_model, scorer_space, tokens, device="cpu")  # the parent's outputs, kept once
METHODS = {"slimgpt-log": ("slimgpt", {"schedule": "log"}), "flap": ("flap", {}), "shortgpt": ("shortgpt", {})}
points = []
for name, (method, options) in METHODS.items():
    pruned = copy.deepcopy(parent.model)
    compress.prune(pruned, method=method, tokens=tokens, device="cpu", ratio=round(1 - budget, 4), **options)
    points.append({"label": name, "model": pruned, **evaluator.reference_point(pruned)})
print(study.table(points, ["label", "params", "kl", "ppl", "depth"]))

# %% [markdown]
# ## A front member at the budget, as searched and SlimGPT-compensated, on held-out text

# %%
protocol = dict(data=data, seqlen=eval_seqlen, windows=eval_windows, tokenizer=parent.tokenizer)
rows = [{"row": "parent", "params": 1.0, "perplexity": compress.evaluate(parent.model, **protocol)["perplexity"]}]
for compensate in ("searched", "slimgpt"):
    folder = export_subnet(work / "run", work / f"searched-{compensate}", budget=budget, compensate=compensate,
                           compensate_samples=compensate_samples, compensate_seqlen=compensate_seqlen, device="cpu")
    searched = compress.load(folder).model
    rows.append({"row": f"search ({compensate})", **evaluator.reference_point(searched),
                 "perplexity": compress.evaluate(searched, **protocol)["perplexity"]})
    points.append({"label": f"search+{compensate}", **{k: rows[-1][k] for k in ("params", "kl", "ppl")}})
for point in points[:len(METHODS)]:
    rows.append({"row": point["label"], "params": point["params"], "kl": point["kl"],
                 "perplexity": compress.evaluate(point.pop("model"), **protocol)["perplexity"]})
print(study.table(rows, ["row", "params", "kl", "perplexity"]))

# %% [markdown]
# ## The front against the pruning methods
#
# Grey: every evaluated candidate; blue: the front; squares: the pruning methods and the exported
# member at the budget, all scored on the same calibration tokens against the same parent.

# %%
fig, (ax_front, ax_ppl) = plt.subplots(1, 2, figsize=(13, 4.5))
ax_front.scatter([r["params"] for r in record["candidates"]], [r["kl"] for r in record["candidates"]], s=10,
                 color="0.7", label="evaluated")
ax_front.plot([r["params"] for r in front], [r["kl"] for r in front], "o-", color="C0", label="front")
for i, point in enumerate(points):
    ax_front.scatter([point["params"]], [point["kl"]], marker="s", s=50, color=f"C{i + 1}", label=point["label"])
ax_front.axvline(budget, color="0.8", lw=0.8)
ax_front.set_xlabel("decoder parameters (fraction of the parent)")
ax_front.set_ylabel(f"KL to the parent (calibration, {calib_samples} × {calib_seqlen})")
ax_front.set_yscale("log")
ax_front.legend(fontsize=8)
ax_front.grid(True, which="both", alpha=0.3)
named = rows[1:]
ax_ppl.bar([r["row"] for r in named], [r["perplexity"] for r in named], color=[f"C{i + 1}" for i in range(len(named))])
ax_ppl.axhline(rows[0]["perplexity"], color="k", ls="--", label="parent")
ax_ppl.set_ylabel(f"perplexity ({data} @{eval_seqlen} × {eval_windows} windows)")
ax_ppl.set_yscale("log")
ax_ppl.tick_params(axis="x", labelrotation=20, labelsize=8)
ax_ppl.legend(fontsize=8)
fig.suptitle(f"{model}: {space} search ({len(record['candidates'])} candidates) vs pruning at {budget:.0%} "
             "of the decoder parameters")
fig.tight_layout()
png = study.save_figure(fig, out_dir, "search")
plt.show()

# %%
results = study.write_results(out_dir, "search", {
    "parameters": settings, "front": front, "points": points, "rows": rows,
    "search_seconds": record["seconds"], "seconds": round(time.perf_counter() - started, 1)})
study.remove_work_folder(work, work_dir)
print(f"wrote {png} and {results} in {time.perf_counter() - started:.0f} s")
