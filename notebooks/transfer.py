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
# # Fine-tuning transfer: how much of a skill moves to another version, against λ and the diff's rank?
#
# **Question.** A fine-tune of version 1 taught a skill; version 2 is the same model after more
# pre-training. Adding the diff Δ = θ_ft − θ_v1 to version 2, θ_v2 + λ·Δ, with no training: how much of
# the fine-tune's accuracy gain does version 2 get, as λ goes from 0 to past 1, and when Δ is replaced
# by its rank-K truncated SVD (the shippable low-rank diff)?
#
# The versions are made here, cheaply, and say so:
#
# * **v1** is `model`.
# * **v2** is v1 after continued training on WikiText-2 train windows: AdamW on the top `v2_layers`
#   decoder layers and the final norm only (a full-weight run does not fit a CPU budget); the rest of
#   v2 equals v1, so v2 is a *near* version (drift of a few percent in the trained layers).
# * **v1-ft** is v1 fine-tuned on a skill it does not have: swap two words (`Swap: w1 w2 =>` →
#   ` w2 w1`, single-token words), the top `ft_layers` layers, loss on the answer. Accuracy is the
#   exact match of both answer tokens (all greedy argmaxes right) on held-out word pairs never trained on.
#
# The transfer itself is the registered `transfer` method on the in-memory v2
# (`compress.compress(v2, "transfer", source_base=..., source_ft=..., scale=λ, rank=K)`), the same
# plan, checks and float64 arithmetic as `compress transfer`. Share of the gain =
# (accuracy − v2's) / (v1-ft's − v1's).
#
# The defaults run on the idle 2-core CPU in about 1.5 minutes (4 values of λ, 3 ranks). The study at full size follows
# `evaluation/bench_transfer.py` (`v2_steps=300`, `ft_steps=40`, `train_examples=96`, more λ and ranks).

# %% tags=["parameters"]
model: str = "smollm2-135m"  # v1: an alias, a Hugging Face folder or a GGUF file
scales: list[float] = [0.0, 0.5, 1.0, 1.5]  # λ
ranks: list[int] = [1, 4, 16]  # ranks of the low-rank diffs, at λ 1
v2_layers: int = 6  # v2: top decoder layers trained on WikiText-2
v2_steps: int = 20
v2_batch: int = 2
v2_seqlen: int = 64
v2_lr: float = 2e-4
ft_layers: int = 4  # v1-ft: top decoder layers fine-tuned on the skill
ft_steps: int = 30
ft_batch: int = 8
ft_lr: float = 3e-4
train_examples: int = 96  # word pairs to learn from
eval_examples: int = 32  # held-out word pairs
eval_seqlen: int = 256  # perplexity protocol (WikiText-2 test)
eval_windows: int = 2
threads: int = 0  # torch threads (0: torch's default, every core; 1 is faster on a CPU shared with other jobs)
out_dir: str = "results"  # the figure (PNG) and the numbers (JSON)
work_dir: str | None = None  # where v1-ft is written (None: a temporary folder, removed)

# %%
import study
from compress.errors import CompressError

settings = study.check_parameters(globals(), __annotations__, "transfer")
if any(k < 1 for k in ranks):
    raise CompressError(f"transfer: every rank must be a positive integer, got {ranks}")

# %% [markdown]
# ## v1, the skill's data, and the two trained versions

# %%
import copy
import time

import matplotlib.pyplot as plt
import torch
from transformers.utils import logging as hf_logging

import compress
from compress.data import calibration_tokens
from evaluation.bench_transfer import answer_logits, task_accuracy, task_examples

hf_logging.disable_progress_bar()
if threads:
    torch.set_num_threads(threads)
started = time.perf_counter()
torch.manual_seed(0)
v1 = compress.load(model)
tokenizer = v1.tokenizer
train, held_out = task_examples(tokenizer, train_examples, eval_examples)  # (n, prompt + 2 answer tokens)
n_layers = v1.model.config.num_hidden_layers


def train_top_layers(m, layers: int, steps: int, lr: float, loss_of_step) -> list[float]:
    """AdamW on the top ``layers`` decoder layers and the final norm of ``m``; all else frozen."""
    for p in m.parameters():
        p.requires_grad_(False)
    params = [p for layer in m.model.layers[-min(layers, n_layers):] for p in layer.parameters()]
    params += list(m.model.norm.parameters())
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    m.train()
    losses = []
    for step in range(steps):
        loss = loss_of_step(m, step)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    m.eval()
    for p in m.parameters():
        p.requires_grad_(False)
    return losses


# v2: continued pre-training on WikiText-2 train windows
windows = calibration_tokens(v1.model, tokenizer, "wikitext2", v2_steps * v2_batch, v2_seqlen, seed=1)
v2 = copy.deepcopy(v1.model)
v2_losses = train_top_layers(v2, v2_layers, v2_steps, v2_lr,
                             lambda m, s: m(input_ids=windows[s * v2_batch:(s + 1) * v2_batch],
                                            labels=windows[s * v2_batch:(s + 1) * v2_batch]).loss)

# v1-ft: the skill, loss on the two answer tokens
order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))


def ft_loss(m, step):
    ids = train[order[(torch.arange(ft_batch) + step * ft_batch) % len(train)]]
    return torch.nn.functional.cross_entropy(answer_logits(m, ids).flatten(0, 1).float(), ids[:, -2:].flatten())


ft = copy.deepcopy(v1.model)
ft_losses = train_top_layers(ft, ft_layers, ft_steps, ft_lr, ft_loss)
work = study.work_folder(work_dir)
ft_folder = work / "v1-ft"
ft.save_pretrained(ft_folder)  # the transfer reads Δ from the two checkpoints, block by block

print(f"v2 loss {v2_losses[0]:.3f} → {v2_losses[-1]:.3f} ({v2_steps} steps); "
      f"v1-ft loss {ft_losses[0]:.3f} → {ft_losses[-1]:.3f} ({ft_steps} steps); {time.perf_counter() - started:.0f} s")

# %% [markdown]
# ## Accuracy of the versions, then of v2 + λ·Δ and v2 + rank-K Δ

# %%
protocol = dict(data="wikitext2", seqlen=eval_seqlen, windows=eval_windows, tokenizer=tokenizer)


def measure(m) -> dict:
    return {"accuracy": task_accuracy(m, held_out), "perplexity": compress.evaluate(m, **protocol)["perplexity"]}


versions = {"v1": measure(v1.model), "v1-ft": measure(ft), "v2": measure(v2)}
gain = versions["v1-ft"]["accuracy"] - versions["v1"]["accuracy"]


def transferred(**options) -> dict:
    target = copy.deepcopy(v2)
    compress.compress(target, "transfer", source_base=str(v1.path), source_ft=str(ft_folder), **options)
    row = {**options, **measure(target)}
    row["share_of_gain"] = (row["accuracy"] - versions["v2"]["accuracy"]) / gain if gain > 0 else float("nan")
    return row


by_scale = [transferred(scale=float(s)) for s in scales]
by_rank = [transferred(scale=1.0, rank=int(k)) for k in ranks]
print(study.table([{"model": k, **v} for k, v in versions.items()]))
print()
print(study.table(by_scale, ["scale", "accuracy", "share_of_gain", "perplexity"]))
print()
print(study.table(by_rank, ["rank", "accuracy", "share_of_gain", "perplexity"]))

# %% [markdown]
# ## Accuracy against λ and against the rank of Δ

# %%
full = next((r for r in by_scale if r["scale"] == 1.0), None) or transferred(scale=1.0)
fig, (ax_scale, ax_rank) = plt.subplots(1, 2, figsize=(13, 4.5))
ax_scale.plot([r["scale"] for r in by_scale], [r["accuracy"] for r in by_scale], "o-", label="v2 + λ·Δ")
ax_rank.plot([r["rank"] for r in by_rank], [r["accuracy"] for r in by_rank], "s-", color="tab:green",
             label="v2 + rank-K Δ (λ = 1)")
ax_rank.axhline(full["accuracy"], color="tab:blue", ls=":", label="v2 + full Δ")
for ax in (ax_scale, ax_rank):
    for name, color in (("v1", "gray"), ("v1-ft", "tab:red"), ("v2", "black")):
        ax.axhline(versions[name]["accuracy"], color=color, ls="--", lw=1, label=name)
    ax.set_ylabel(f"held-out swap accuracy ({len(held_out)} pairs)")
    ax.set_ylim(-0.03, 1.03)
    ax.grid(True, alpha=0.3)
ax_scale.set_xlabel("λ")
ax_rank.set_xscale("log", base=2)
ax_rank.set_xlabel("rank K of each matrix's diff")
ax_scale.legend(fontsize=8)
ax_rank.legend(fontsize=8)
fig.suptitle(f"{model}: the swap skill moved from v1-ft to v2 (top {ft_layers} layers fine-tuned, "
             f"v2 = top {v2_layers} layers × {v2_steps} steps of WikiText-2)")
fig.tight_layout()
png = study.save_figure(fig, out_dir, "transfer")
plt.show()

# %%
results = study.write_results(out_dir, "transfer", {
    "parameters": settings, "versions": versions, "gain": gain, "by_scale": by_scale, "by_rank": by_rank,
    "v2_losses": v2_losses, "ft_losses": ft_losses, "seconds": round(time.perf_counter() - started, 1)})
study.remove_work_folder(work, work_dir)
print(f"wrote {png} and {results} in {time.perf_counter() - started:.0f} s")
