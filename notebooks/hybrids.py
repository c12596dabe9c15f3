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
# # Hybrids: how much KV cache can a Zebra-Llama hybrid give up, and what does distillation buy?
#
# **Question.** A Zebra-Llama hybrid keeps a few layers as MLA (a compressed KV cache) and turns the
# rest into Mamba2 (a constant-size state, no KV cache). Against the fraction of the parent's KV cache
# it keeps, how do its perplexity and its KL to the parent move, how much of the gap does layer-wise
# distillation (ILD) close, and what does a short end-to-end KD add?
#
# One ILD walk trains both replacement mixers of every layer (teacher-forced, in the layer walk, as
# `compress distill` does); SMART then ranks the layers by how much swapping each alone to MLA lowers the
# all-Mamba2 student's KL. Hybrids with K = `n_mla` MLA layers (SMART's choice for each K), all-Mamba2,
# all-MLA and a 50%-attention hybrid (attention in the even layers, Mamba2 in the odd ones) are then
# assembled twice, untrained (`compress hybridize`'s initialisation) and from the ILD'd mixers, and
# all are scored on the same held-out windows: perplexity, and KL(parent ‖ hybrid) and top-1 agreement
# with the parent's logits from one parent forward per window. With `kd_steps > 0` the SMART hybrid at
# `kd_mla` MLA layers is also trained end to end (KL to the parent, all parameters) and scored again.
#
# The defaults run on the idle 2-core CPU in about 4 minutes (ILD on 16 × 256 tokens, one epoch; two
# 256-token evaluation windows; 2 KD steps of 4 × 256 tokens): a sketch of the trade-off, not its level.
# At that budget every hybrid is far from the parent (perplexity in the thousands or more), ILD helps
# every layout that keeps some MLA or attention layers but leaves the all-Mamba2 one worse than its
# initialisation (each layer fitted alone, teacher-forced, on 4 steps: the errors compound), and two KD
# steps already lower the KL of the 4-MLA hybrid well below its ILD'd value.
# The study at full size is `evaluation/bench_distill.py` (ILD 32768 tokens × 2 epochs, KD 65536 tokens,
# 40 windows at 2048) or `n_mla=[1, 2, 4, 8, 15], seqlen=512, ild_samples=64, ild_epochs=2,
# smart_samples=8, kd_steps=16, kd_batch=8, eval_seqlen=2048, eval_windows=40` here; on a GPU box the paper's budgets
# (`recipes/llama3.2-1b-zebra-distill-4mla12m2.yaml`).

# %% tags=["parameters"]
model: str = "smollm2-135m"  # an alias, a Hugging Face folder or a GGUF file (a LLaMA-family parent)
n_mla: list[int] = [2, 4, 8]  # the MLA layer counts (SMART's choice at each)
kv_rank: int = 128  # MLA's compressed KV rank r_kv
rope_dim: int = 32  # MLA's decoupled RoPE key width d_rope
q_rank: int = 384  # MLA's query rank r_q
data: str = "wikitext2"  # training text (train excerpt; cut into disjoint windows) and evaluation text (test split)
seqlen: int = 256  # tokens per training window (ILD, SMART, KD)
ild_samples: int = 16  # ILD windows
ild_epochs: int = 1
ild_lr: float = 1.0e-3
ild_batch: int = 4  # windows per ILD step
smart_samples: int = 2  # SMART's held-out windows
kd_steps: int = 2  # end-to-end KD steps for the SMART hybrid at kd_mla MLA layers (0: none)
kd_mla: int = 4
kd_batch: int = 4  # windows per KD step
kd_lr: float = 1.0e-4
eval_seqlen: int = 256
eval_windows: int = 2
threads: int = 0  # torch threads (0: torch's default, every core)
out_dir: str = "results"  # the figure (PNG) and the numbers (JSON)
work_dir: str | None = None  # where the reloaded hybrid is written (None: a temporary folder)

# %%
import study
from compress.errors import CompressError

settings = study.check_parameters(globals(), __annotations__, "hybrids")
if kd_steps < 0 or (kd_steps and kd_mla not in n_mla):
    raise CompressError(f"hybrids: kd_mla ({kd_mla}) must be one of n_mla {n_mla} when kd_steps > 0, "
                        f"and kd_steps ≥ 0 (got {kd_steps})")

# %% [markdown]
# ## The parent, the tokens, and one ILD walk of both mixers of every layer

# %%
import math
import time

import matplotlib.pyplot as plt
import torch
from transformers.utils import logging as hf_logging

import compress
from compress.data import evaluation_stream
from compress.distill.config import DistillConfig
from compress.distill.plan import make_plan
from compress.distill.ild import ILDConfig, LayerDistillation
from compress.distill.smart import check_k
from compress.walk import walk

hf_logging.disable_progress_bar()
if threads:
    torch.set_num_threads(threads)
started = time.perf_counter()
parent = compress.load(model)
teacher, tokenizer = parent.model.eval(), parent.tokenizer
layers = teacher.config.num_hidden_layers
for k in n_mla:
    check_k(k, layers)
plan = make_plan(teacher, tokenizer, DistillConfig(
    data=data, seqlen=seqlen, ild_tokens=ild_samples * seqlen, smart_tokens=smart_samples * seqlen,
    kd_tokens=kd_steps * kd_batch * seqlen, batch_size=kd_batch, n_mla=kd_mla, q_rank=q_rank, kv_rank=kv_rank,
    rope_dim=rope_dim))  # the windows `compress distill` would use: disjoint, seeded
ild_tokens, smart_tokens, kd_tokens = plan.ild_tokens, plan.smart_tokens, plan.kd_tokens
ranks = (q_rank, kv_rank, rope_dim)
ild = LayerDistillation(ILDConfig(q_rank=q_rank, kv_rank=kv_rank, rope_dim=rope_dim, mixers=["mla", "mamba2"],
                                  epochs=ild_epochs, lr=ild_lr, seed=0))
ild.prepare(teacher)
ild_started = time.perf_counter()
walked = walk(teacher, ild_tokens, [ild], device="cpu", batch_size=ild_batch)
ild_seconds = time.perf_counter() - ild_started
distances = [{"layer": i, **{f"{kind} {when}": walked.records[i][ild.name][kind][when] for kind in ("mla", "mamba2")
                             for when in ("before", "after")}} for i in range(layers)]
print(f"ILD of {layers} layers × 2 mixers on {ild_tokens.numel()} tokens: {ild_seconds:.0f} s")
print(study.table(distances))

# %% [markdown]
# ## SMART: which layers gain most from MLA

# %%
from compress.distill.kd import assemble, load_mixer
from compress.distill.smart import choose_layers, measure_sensitivities
from compress.hybrid.build import build_mixer, hybrid_config, parent_shape

mla_config = hybrid_config(teacher.config, parent_shape(teacher), ["mla"] * layers, *ranks)
all_mamba = assemble(teacher, ild.bank, ["mamba2"] * layers, ranks)
smart = measure_sensitivities(all_mamba, teacher,
                              lambda i: load_mixer(build_mixer(mla_config, i, "mla"), ild.bank[i]["mla"]),
                              smart_tokens, ild_batch, "cpu")
del all_mamba
choices = {k: choose_layers(smart["sensitivity"], k) for k in n_mla}
print("sensitivities:", [round(s, 4) for s in smart["sensitivity"]])
print("SMART's choices:", choices)

# %% [markdown]
# ## Every hybrid, untrained and ILD'd, scored on the same windows against the parent's logits

# %%
from compress.hybrid.build import hybridize
from compress.metrics.cost import kv_cache_fraction
from compress.metrics.fidelity import window_fidelity
from compress.metrics.logits import logit_source
from compress.metrics.perplexity import window_starts


def kinds_with(mla):
    return ["mla" if i in mla else "mamba2" for i in range(layers)]


layouts = {"all-Mamba2": kinds_with([]), **{f"{k} MLA (SMART)": kinds_with(choices[k]) for k in n_mla},
           "50% attention": ["attention" if i % 2 == 0 else "mamba2" for i in range(layers)],
           "all-MLA": ["mla"] * layers}
stream = evaluation_stream(tokenizer, data)
windows = [stream[s:s + eval_seqlen][None] for s in window_starts(stream.numel(), eval_seqlen, eval_seqlen,
                                                                   eval_windows)]
references = [logit_source(teacher, ids) for ids in windows]  # the parent runs once per window


@torch.no_grad()
def score(m) -> dict:
    """Perplexity, KL(parent ‖ model) and top-1 agreement on the evaluation windows, against the parent's
    logits (both streamed over vocabulary chunks); ``m`` None scores the parent itself."""
    nll, kl, agree, positions = 0.0, 0.0, 0, 0
    for ids, reference in zip(windows, references):
        window_nll, window_kl, agreeing = window_fidelity(reference if m is None else m.eval(), ids, reference)
        nll += window_nll.item()
        kl += window_kl.item()
        agree += agreeing
        positions += ids.numel()
    return {"perplexity": math.exp(nll / len(windows)), "kl": kl / positions, "top1": agree / positions}


rows = [{"hybrid": "parent", "weights": "parent", "kv_fraction": 1.0, **score(None)}]
for name, kinds in layouts.items():  # each hybrid is built, scored and dropped (one in memory at a time)
    for weights in ("untrained", "ILD"):
        if weights == "ILD":
            hybrid = assemble(teacher, ild.bank, kinds, ranks)
        else:
            hybrid = hybridize(teacher, mla_layers=[i for i, t in enumerate(kinds) if t == "mla"],
                               mamba_layers=[i for i, t in enumerate(kinds) if t == "mamba2"], q_rank=q_rank,
                               kv_rank=kv_rank, rope_dim=rope_dim, seed=0)
        rows.append({"hybrid": name, "weights": weights, "kv_fraction": kv_cache_fraction(hybrid),
                     "layer_types": kinds, **score(hybrid)})
        del hybrid
print(study.table(rows, ["hybrid", "weights", "kv_fraction", "perplexity", "kl", "top1"]))

# %% [markdown]
# ## A short end-to-end KD of one hybrid, and its output reloaded

# %%
from compress.distill.kd import train_kd
from compress.train.loop import TrainConfig, make_accelerator

work = study.work_folder(work_dir)
kd_row = None
if kd_steps:
    name = f"{kd_mla} MLA (SMART)"
    student = assemble(teacher, ild.bank, layouts[name], ranks)
    kd_started = time.perf_counter()
    result = train_kd(student, teacher, kd_tokens, None,
                      TrainConfig(steps=kd_steps, lr=kd_lr, batch_size=kd_batch, seed=0), make_accelerator(1, "cpu"))
    kd_seconds = time.perf_counter() - kd_started
    folder = compress.save(student, work / "hybrid-kd", tokenizer=tokenizer)
    reloaded = compress.load(folder).model
    kd_row = {"hybrid": name, "weights": f"ILD + KD {kd_steps} steps", "kv_fraction": kv_cache_fraction(student),
              "layer_types": layouts[name], **score(student), "kd_tokens": kd_tokens.numel(),
              "kd_seconds": round(kd_seconds, 1), "kd_losses": result.train_losses,
              "reloaded_perplexity": score(reloaded)["perplexity"], "folder": str(folder)}
    rows.append(kd_row)
    print(study.table(rows[-1:], ["hybrid", "weights", "kv_fraction", "perplexity", "kl", "top1", "kd_seconds"]))

# %% [markdown]
# ## Perplexity and KL against the KV cache kept
#
# Each point is a hybrid (its share of the parent's KV cache on the x axis; all-Mamba2 sits at 0, the
# 50%-attention hybrid at 0.5, all-MLA at its rank's share). Orange: the ILD'd mixers; grey: the same
# layouts untrained; black: the parent; red: after the short KD.

# %%
fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
for ax, key, label in ((axes[0], "perplexity", f"perplexity ({data} @{eval_seqlen} × {eval_windows})"),
                       (axes[1], "kl", "KL(parent ‖ hybrid), nats per token")):
    for weights, color in (("untrained", "0.6"), ("ILD", "C1")):
        pts = sorted((r["kv_fraction"], r[key]) for r in rows if r["weights"] == weights)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=color, label=weights)
        for r in rows:
            if r["weights"] == weights == "ILD":
                ax.annotate(r["hybrid"], (r["kv_fraction"], r[key]), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")
    if key == "perplexity":
        ax.scatter([1.0], [rows[0]["perplexity"]], color="k", zorder=3, label="parent")
    if kd_row is not None:
        ax.scatter([kd_row["kv_fraction"]], [kd_row[key]], color="C3", marker="*", s=120, zorder=3,
                   label=f"ILD + KD ({kd_steps} steps)")
    ax.set_xscale("symlog", linthresh=0.01)
    ax.set_yscale("log")
    ax.set_xlabel("KV cache kept (fraction of the parent's)")
    ax.set_ylabel(label)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
fig.suptitle(f"{model}: Zebra-Llama hybrids (r_kv {kv_rank}, d_rope {rope_dim}; ILD on "
             f"{ild_tokens.numel()} tokens × {ild_epochs} epoch(s))")
fig.tight_layout()
png = study.save_figure(fig, out_dir, "hybrids")
plt.show()

# %%
results = study.write_results(out_dir, "hybrids", {
    "parameters": settings, "rows": rows, "smart": {**smart, "choices": {str(k): v for k, v in choices.items()}},
    "ild": {"tokens": ild_tokens.numel(), "seconds": round(ild_seconds, 1), "distances": distances},
    "seconds": round(time.perf_counter() - started, 1)})
study.remove_work_folder(work, work_dir)
print(f"wrote {png} and {results} in {time.perf_counter() - started:.0f} s")
