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
# # Adapters: Bone vs Bat vs LoRA at equal trainable parameters
#
# **Question.** With the same number of trainable parameters, the same data, order, steps, batch and
# training loop, how fast does each adapter learn? Bone (peft's MiSS default form: one r × out block
# shared by the input blocks), Bat (Bone's weight-guided form, ΔW = W·B + B per r × r block) and LoRA
# (ΔW = (α/r)·B·A, its rank chosen so that its parameter count is the closest to Bone's).
#
# The task is one the base model cannot know: `Encode 12345` → the digits through a fixed substitution
# cipher (`evaluation/bench_adapt.py`'s), in the chat template, loss on the answer tokens only. The
# adapters sit on all seven projections of the top `adapt_layers` decoder layers. Each method trains a
# fresh copy of the model through the method registry (`bone`, `bat`, `lora`: the same `run` as
# `compress adapt`, with `compress.train.loop`); the curves are the training loss of every step and the
# held-out loss every `eval_every` steps; exact match (greedy generation) on the held-out pairs at the end.
#
# One learning rate per method (`learning_rates`): at 5e-3 Bat's update, which scales with the weights,
# overshoots (`evaluation/results/adapt-smollm2.md`), so it gets 1e-3. The defaults run on the idle 2-core CPU
# in about 65 s (20 steps on 4 layers); the study at full size: `adapt_layers=6, steps=100, train_pairs=800,
# eval_pairs=64`.

# %% tags=["parameters"]
model: str = "smollm2-135m"  # an alias, a Hugging Face folder or a GGUF file
methods: list[str] = ["bone", "bat", "lora"]
r: int = 32  # Bone/Bat block size; LoRA's rank is matched to their parameter count
adapt_layers: int = 4  # adapters on the top decoder layers (all seven projections)
steps: int = 20
batch_size: int = 8
learning_rates: dict[str, float] = {"bone": 0.005, "bat": 0.001, "lora": 0.005}
eval_every: int = 5
train_pairs: int = 160
eval_pairs: int = 16
seqlen: int = 64  # tokens per example (prompt and answer)
threads: int = 0  # torch threads (0: torch's default, every core; 1 is faster on a CPU shared with other jobs)
out_dir: str = "results"  # the figure (PNG) and the numbers (JSON)

# %%
import study
from compress.errors import CompressError

settings = study.check_parameters(globals(), __annotations__, "adapters")
missing = [m for m in methods if m not in learning_rates]
if missing:
    raise CompressError(f"adapters: learning_rates has no rate for method '{missing[0]}'")

# %% [markdown]
# ## The task, and ranks at equal trainable parameters

# %%
import copy
import time

import matplotlib.pyplot as plt
import torch
from transformers.utils import logging as hf_logging

import compress
from compress.methods.bone.adapter import ALL_PROJECTIONS, adapter_parameters, targeted_linears
from compress.plugin import RunContext, build_method
from compress.train.data import pair_example
from compress.train.loop import TrainConfig
from evaluation.bench_adapt import SYSTEM, cipher_rows, exact_match

hf_logging.disable_progress_bar()
if threads:
    torch.set_num_threads(threads)
started = time.perf_counter()
base = compress.load(model)
tokenizer = base.tokenizer
rows = cipher_rows(train_pairs + eval_pairs, seed=0)
train_rows, eval_rows = rows[:train_pairs], rows[train_pairs:]
train_set = [pair_example(tokenizer, x["instruction"], x["response"], seqlen, SYSTEM) for x in train_rows]
eval_set = [pair_example(tokenizer, x["instruction"], x["response"], seqlen, SYSTEM) for x in eval_rows]
n_layers = base.model.config.num_hidden_layers
layers = list(range(max(0, n_layers - adapt_layers), n_layers))
modules = targeted_linears(base.model, ALL_PROJECTIONS, layers)
budget = adapter_parameters("bone", r, modules)
widest = max(max(m.in_features, m.out_features) for m in modules.values())
lora_rank = min(range(1, widest + 1), key=lambda k: abs(adapter_parameters("lora", k, modules) - budget))
ranks = {"bone": r, "bat": r, "lora": lora_rank}
print(f"{len(train_set)} training and {len(eval_set)} held-out pairs; layers {layers[0]}-{layers[-1]}; "
      f"Bone/Bat r {r}: {budget:,} parameters; LoRA rank {lora_rank}: "
      f"{adapter_parameters('lora', lora_rank, modules):,}")
base_match = exact_match(base.model, tokenizer, eval_rows)
print(f"base model exact match: {base_match:.1%}")

# %% [markdown]
# ## Train each adapter

# %%
runs = []
for name in methods:
    if name not in ranks:
        raise CompressError(f"adapters: unknown method '{name}' (methods: bone, bat, lora)")
    method = build_method(name, {"r": ranks[name], "layers": layers}, verb="adapt")
    config = TrainConfig(steps=steps, lr=learning_rates[name], batch_size=batch_size, eval_every=eval_every, seed=0)
    t0 = time.perf_counter()
    ran = method.run(RunContext(model=copy.deepcopy(base.model), tokenizer=tokenizer, seed=0,
                                extras={"train_examples": train_set, "eval_examples": eval_set,
                                        "train_config": config}))
    result = ran["result"]
    runs.append({"method": name, "r": ranks[name], "lr": learning_rates[name],
                 "trainable_parameters": ran["trainable_parameters"], "train_losses": result.train_losses,
                 "eval_losses": result.eval_losses, "final_eval_loss": result.final_eval_loss,
                 "exact_match": exact_match(ran["model"], tokenizer, eval_rows),
                 "seconds_per_step": result.seconds_per_step, "seconds": round(time.perf_counter() - t0, 1)})
    del ran
    print(study.table(runs[-1:], ["method", "r", "lr", "trainable_parameters", "final_eval_loss", "exact_match",
                                  "seconds_per_step"]))

# %% [markdown]
# ## Loss curves

# %%
fig, (ax_train, ax_eval) = plt.subplots(1, 2, figsize=(13, 4.5))
for i, run in enumerate(runs):
    color = plt.get_cmap("tab10")(i)
    label = f"{run['method']} (r {run['r']}, {run['trainable_parameters']:,} params, lr {run['lr']:g})"
    steps_, losses = zip(*run["train_losses"])
    ax_train.plot(steps_, losses, color=color, alpha=0.35)
    window = max(1, len(losses) // 10)  # a moving mean over a tenth of the run
    smooth = [sum(losses[max(0, k - window + 1):k + 1]) / len(losses[max(0, k - window + 1):k + 1])
              for k in range(len(losses))]
    ax_train.plot(steps_, smooth, color=color, label=label)
    ax_eval.plot(*zip(*run["eval_losses"]), "o-", color=color, label=f"{label}: exact match {run['exact_match']:.0%}")
ax_train.set_ylabel("training loss (answer tokens)")
ax_eval.set_ylabel(f"held-out loss ({len(eval_set)} pairs)")
for ax in (ax_train, ax_eval):
    ax.set_xlabel("step")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
fig.suptitle(f"{model}: Bone vs Bat vs LoRA at ~{budget:,} trainable parameters, layers {layers[0]}-{layers[-1]}, "
             f"batch {batch_size}")
fig.tight_layout()
png = study.save_figure(fig, out_dir, "adapters")
plt.show()

# %%
results = study.write_results(out_dir, "adapters", {
    "parameters": settings, "layers": layers, "budget": budget, "ranks": ranks, "base_exact_match": base_match,
    "runs": runs, "seconds": round(time.perf_counter() - started, 1)})
print(f"wrote {png} and {results} in {time.perf_counter() - started:.0f} s")
