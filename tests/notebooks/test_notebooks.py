"""The study notebooks (notebooks/*.py, paired .ipynb): each runs top to bottom in a fresh kernel with
its defaults, on the embedded default model (smollm2-135m), writes a PNG with content and numbers that
hold up against independent checks; a bad parameter is one clear error.

The only values injected are where the results go (``out_dir``, and ``work_dir`` where a test reads the
written checkpoints). The six together take about 13 minutes on the idle 2-core CPU (the defaults are
sized for it: a few hundred calibration tokens, two evaluation windows); the studies at full size are
the notebooks with larger parameters (each notebook's opening text, ``notebooks/results/``).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from compress.errors import CompressError
from tests.helpers import REPO

NOTEBOOKS = REPO / "notebooks"
sys.path.insert(0, str(NOTEBOOKS))
import run_notebook  # noqa: E402  (notebooks/run_notebook.py: how the tests and users execute a notebook)

# A notebook is minutes of work in a kernel: on a loaded machine one can pass the suite-wide 900 s, and a
# SIGALRM landing in papermill's wait has crashed pytest itself (INTERNALERROR while formatting the stack)
# instead of failing one test; twice the limit keeps a slow machine's run going.
pytestmark = pytest.mark.timeout(1800)

EXPECTED = ["adapters", "hybrids", "pruning_tradeoffs", "quantization_tradeoffs", "search", "stacking", "transfer"]


def defaults(name: str) -> dict:
    """The notebook's parameters cell, as declared."""
    return {k: v for k, (_, v) in run_notebook.declared_parameters(run_notebook.read(name), name).items()}


def execute(name, tmp_path, **extra):
    out = tmp_path / "results"
    run_notebook.execute(name, {"out_dir": str(out), **extra})
    return out, json.loads((out / f"{name}.json").read_text())


def assert_png_has_content(path):
    from matplotlib.image import imread

    image = imread(path)[..., :3]  # (H, W, 3) in [0, 1]
    assert image.shape[0] > 300 and image.shape[1] > 600, image.shape
    assert image.std() > 0.05 and (image.mean(-1) < 0.9).mean() > 0.01  # not blank: lines, points, text


def hf_perplexity(folder, seqlen: int, windows: int) -> float:
    """Perplexity from transformers' own loss on the protocol's first windows (independent of
    compress.metrics): exp(mean over windows of the mean next-token loss)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from compress.data import evaluation_stream

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    stream = evaluation_stream(AutoTokenizer.from_pretrained(folder), "wikitext2")
    with torch.no_grad():
        losses = [model(input_ids=w[None], labels=w[None]).loss.item()
                  for w in stream[:seqlen * windows].reshape(windows, seqlen)]
    return math.exp(sum(losses) / windows)


def test_every_notebook_is_paired_stripped_and_opens_with_its_question_and_parameters():
    import jupytext

    assert set(EXPECTED) <= set(run_notebook.names())
    for name in run_notebook.names():  # every notebook of the folder, these five and later ones
        text, paired = jupytext.read(NOTEBOOKS / f"{name}.py"), jupytext.read(NOTEBOOKS / f"{name}.ipynb")
        assert [(c.cell_type, c.source) for c in paired.cells] == [(c.cell_type, c.source) for c in text.cells], name
        for cell in paired.cells:  # stored without outputs, so a diff shows only the code
            assert not cell.get("outputs") and cell.get("execution_count") is None, name
        first, second = text.cells[0], text.cells[1]
        assert first.cell_type == "markdown" and "**Question.**" in first.source, name
        assert second.metadata.get("tags") == ["parameters"], name
        declared = run_notebook.declared_parameters(text, name)
        assert declared["model"][1] == "smollm2-135m" and declared["out_dir"][1] == "results", name


@pytest.mark.slow
def test_quantization_tradeoffs(smollm2_folder, tmp_path):
    d = defaults("quantization_tradeoffs")
    out, results = execute("quantization_tradeoffs", tmp_path, work_dir=str(tmp_path / "work"))
    assert_png_has_content(out / "quantization_tradeoffs.png")
    rows, g = results["rows"], d["group_size"]
    assert {(r["method"], r["bits"], r["group_size"]) for r in rows} == \
        {(m, b, g) for m in d["methods"] for b in d["bits"]} | \
        {(m, d["group_bits"], s) for m in d["methods"] for s in d["group_sizes"]}
    assert results["float"]["perplexity"] == pytest.approx(
        hf_perplexity(smollm2_folder, d["eval_seqlen"], d["eval_windows"]), rel=1e-4)
    for r in rows:
        folder = tmp_path / "work" / f"{r['method']}-w{r['bits']}-g{r['group_size']}"
        assert r["bytes_on_disk"] == sum(p.stat().st_size for p in folder.glob("*.safetensors"))
        if r["group_size"] > 0:  # packed codes + one float32 scale per group (symmetric: no zero point)
            assert r["bits_per_weight"] == pytest.approx(r["bits"] + 32 / g, abs=1e-9)
    for method in d["methods"]:
        by_bits = {r["bits"]: r for r in rows if r["method"] == method and r["group_size"] == g}
        assert by_bits[2]["kl_divergence"] > by_bits[3]["kl_divergence"] > by_bits[4]["kl_divergence"] \
            > by_bits[8]["kl_divergence"]
        assert by_bits[8]["kl_divergence"] < 5e-3 and by_bits[8]["top1_agreement"] >= 0.97
        assert by_bits[2]["bytes_on_disk"] < by_bits[4]["bytes_on_disk"] < by_bits[8]["bytes_on_disk"]
    gptq, rtn = ({r["bits"]: r for r in rows if r["method"] == m and r["group_size"] == g} for m in ("gptq", "rtn"))
    for b in (3, 4):  # GPTQ's error feedback pays at 3 and 4 bits (KL: 2 × 256 tokens are too few for perplexity)
        assert gptq[b]["kl_divergence"] < rtn[b]["kl_divergence"]


@pytest.mark.slow
def test_pruning_tradeoffs(smollm2_folder, tmp_path):
    from transformers import AutoModelForCausalLM

    d = defaults("pruning_tradeoffs")
    out, results = execute("pruning_tradeoffs", tmp_path)
    assert_png_has_content(out / "pruning_tradeoffs.png")
    rows = results["rows"]
    dense = rows[0]
    assert dense["method"] == "dense"
    assert dense["parameters"] == AutoModelForCausalLM.from_pretrained(smollm2_folder).num_parameters()
    assert dense["perplexity"] == pytest.approx(hf_perplexity(smollm2_folder, d["eval_seqlen"], d["eval_windows"]),
                                                rel=1e-4)
    assert [(r["method"], r["ratio"]) for r in rows[1:]] == [(m, q) for q in d["ratios"] for m in d["methods"]]
    for r in rows[1:]:
        assert r["parameters"] < dense["parameters"] and math.isfinite(r["perplexity"])
        assert r["perplexity"] > dense["perplexity"] and r["prefill_tokens_per_s"] > 0
        if r["method"] in ("slimgpt-log", "slimgpt-uniform", "magnitude", "wanda-sp"):  # follow the plan exactly
            assert r["decoder_removed"] == pytest.approx(r["ratio"], abs=0.01), r
    for m in d["methods"]:
        at = {r["ratio"]: r for r in rows if r["method"] == m}
        assert at[0.4]["parameters"] <= at[0.2]["parameters"]
    at20 = {r["method"]: r for r in rows if r["ratio"] == 0.2}
    assert at20["slimgpt-log"]["perplexity"] < at20["magnitude"]["perplexity"]  # OBS beats the naive baseline


@pytest.mark.slow
def test_search(tmp_path):
    """The search notebook: a front, the three pruning methods at the budget scored on the same tokens, and
    the exported member at the budget scores what its candidate scored in the search (the export is the
    candidate: same KL on the calibration tokens)."""
    out, results = execute("search", tmp_path)
    assert_png_has_content(out / "search.png")
    front, points, rows = results["front"], results["points"], results["rows"]
    budget = defaults("search")["budget"]
    assert front and [r["params"] for r in front] == sorted(r["params"] for r in front)
    assert [p["label"] for p in points] == ["slimgpt-log", "flap", "shortgpt", "search+searched", "search+slimgpt"]
    member = min((r for r in front if r["params"] <= budget + 1e-12), key=lambda r: r["kl"])
    searched = next(p for p in points if p["label"] == "search+searched")
    # float32 log-softmax over 49152 logits, the search's parent reordered vs this one not: ~1e-7 apart
    assert searched["kl"] == pytest.approx(member["kl"], rel=1e-4, abs=1e-7)
    assert searched["params"] == pytest.approx(member["params"], abs=1e-12)
    assert all(math.isfinite(r["perplexity"]) for r in rows) and rows[0]["row"] == "parent"
    for p in points[:3]:  # the pruning methods removed about 1 - budget of the decoder parameters
        assert p["params"] < 1.0 and p["kl"] > 0


@pytest.mark.slow
def test_stacking(smollm2_folder, tmp_path):
    d = defaults("stacking")
    out, results = execute("stacking", tmp_path)
    assert_png_has_content(out / "stacking.png")
    assert_png_has_content(out / "stacking_compare.png")
    rows = {r["model"]: r for r in results["rows"]}
    pruned, w4, w3, stacked = (rows[k] for k in ("slimgpt-0.25", "gptq-w4", "gptq-w3", "slimgpt-0.25+gptq-w4"))
    assert stacked["walks"] == 1  # prune and quantize in one walk
    assert stacked["parameters"] == pruned["parameters"] < w4["parameters"]  # the same SlimGPT plan
    assert stacked["bytes_on_disk"] < w4["bytes_on_disk"] and w3["bytes_on_disk"] < w4["bytes_on_disk"]
    assert results["float"]["perplexity"] == pytest.approx(
        hf_perplexity(smollm2_folder, d["eval_seqlen"], d["eval_windows"]), rel=1e-4)
    compared = results["compare"]
    assert compared["warnings"] == [] and len(compared["rows"]) == 4
    for row in compared["rows"]:  # compress compare read the same numbers the jobs returned
        assert row["perplexity"]["value"] == pytest.approx(rows[row["output"]]["perplexity"], rel=1e-12)
        assert row["bytes_on_disk"] == rows[row["output"]]["bytes_on_disk"]


@pytest.mark.slow
def test_transfer(tmp_path):
    d = defaults("transfer")
    out, results = execute("transfer", tmp_path)
    assert_png_has_content(out / "transfer.png")
    by_scale = {r["scale"]: r for r in results["by_scale"]}
    versions = results["versions"]
    v2 = versions["v2"]
    # λ = 0 leaves v2 as it was (through the float64 arithmetic of the transfer)
    assert by_scale[0.0]["perplexity"] == pytest.approx(v2["perplexity"], rel=1e-6)
    assert by_scale[0.0]["accuracy"] == v2["accuracy"]
    assert by_scale[1.0]["perplexity"] != pytest.approx(v2["perplexity"], rel=1e-6)  # Δ did something
    assert sorted(by_scale) == sorted(d["scales"]) and [r["rank"] for r in results["by_rank"]] == d["ranks"]
    assert len(results["v2_losses"]) == d["v2_steps"] and len(results["ft_losses"]) == d["ft_steps"]
    assert results["ft_losses"][-1] < results["ft_losses"][0] / 4  # the skill is learned by v1-ft
    assert versions["v1-ft"]["accuracy"] > versions["v1"]["accuracy"]
    assert v2["perplexity"] < versions["v1"]["perplexity"]  # v2 trained on WikiText-2: lower perplexity there


@pytest.mark.slow
def test_adapters(smollm2, tmp_path):
    d = defaults("adapters")
    out, results = execute("adapters", tmp_path)
    assert_png_has_content(out / "adapters.png")
    # per layer, from the model's config: out widths of q, k, v, o, gate, up, down and their in widths.
    # Bone/Bat train r × out per projection, LoRA rank × (in + out)
    c = smollm2.model.config
    kv = c.num_key_value_heads * c.hidden_size // c.num_attention_heads
    h, f = c.hidden_size, c.intermediate_size
    outs, ins, layers = [h, kv, kv, h, f, f, h], [h] * 6 + [f], d["adapt_layers"]
    runs = {r["method"]: r for r in results["runs"]}
    bone = d["r"] * sum(outs) * layers
    assert runs["bone"]["trainable_parameters"] == runs["bat"]["trainable_parameters"] == bone
    lora_per_rank = sum(o + i for o, i in zip(outs, ins)) * layers
    assert runs["lora"]["r"] == round(bone / lora_per_rank)
    assert runs["lora"]["trainable_parameters"] == runs["lora"]["r"] * lora_per_rank
    steps = list(range(0, d["steps"] + 1, d["eval_every"]))
    for run in runs.values():
        assert [s for s, _ in run["eval_losses"]] == steps and len(run["train_losses"]) == d["steps"]
        assert run["eval_losses"][-1][1] < run["eval_losses"][0][1]  # it learns


@pytest.mark.slow
def test_hybrids(smollm2_folder, tmp_path):
    """The hybrids notebook: every layout's KV fraction from the config's shapes, the parent's perplexity
    from transformers' own loss, ILD lowering every layer's Mamba2 distance and every Mamba2 hybrid's KL,
    SMART's choices within its rule, and the KD'd hybrid reloading to the same perplexity."""
    from compress.distill.smart import satisfies_rule

    d = defaults("hybrids")
    out, results = execute("hybrids", tmp_path)
    assert_png_has_content(out / "hybrids.png")
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(smollm2_folder)
    n, per_layer = c.num_hidden_layers, 2 * c.num_key_value_heads * c.hidden_size // c.num_attention_heads
    rows = results["rows"]
    parent = rows[0]
    assert parent["hybrid"] == "parent" and parent["kl"] == pytest.approx(0, abs=1e-9) and parent["top1"] == 1.0
    assert parent["perplexity"] == pytest.approx(hf_perplexity(smollm2_folder, d["eval_seqlen"], d["eval_windows"]),
                                                 rel=1e-4)
    hybrids = [r for r in rows[1:] if r["weights"] in ("ILD", "untrained")]
    assert len(hybrids) == 2 * (len(d["n_mla"]) + 3)
    for r in rows[1:]:  # r_kv + d_rope per MLA layer, the parent's K and V per attention layer
        kinds = r["layer_types"]
        expected = (kinds.count("mla") * (d["kv_rank"] + d["rope_dim"]) + kinds.count("attention") * per_layer) \
            / (n * per_layer)
        assert r["kv_fraction"] == pytest.approx(expected, rel=1e-12), r["hybrid"]
    for record in results["ild"]["distances"]:  # ILD never leaves a mixer further from the teacher layer
        assert record["mamba2 after"] < record["mamba2 before"] and record["mla after"] <= record["mla before"]
    by = {(r["hybrid"], r["weights"]): r for r in hybrids}
    for name, weights in by:  # ILD closes part of the gap wherever some MLA or attention layers stay; the
        kinds = by[(name, weights)]["layer_types"]  # all-Mamba2 ILD'd on 4 steps is worse than untrained
        if weights == "ILD" and set(kinds) != {"mamba2"}:
            assert by[(name, "ILD")]["kl"] < 0.95 * by[(name, "untrained")]["kl"], name
    for k, chosen in results["smart"]["choices"].items():
        assert len(chosen) == int(k) and satisfies_rule(chosen, n, int(k)), (k, chosen)
    kd = rows[-1]
    assert kd["weights"].startswith("ILD + KD") and len(kd["kd_losses"]) == d["kd_steps"]
    assert kd["kl"] < 0.9 * by[(kd["hybrid"], "ILD")]["kl"]  # two KD steps already lower the KL
    assert kd["reloaded_perplexity"] == pytest.approx(kd["perplexity"], rel=1e-5)
    assert kd["kd_tokens"] == d["kd_steps"] * d["kd_batch"] * d["seqlen"]


def test_wrong_parameter_type_is_one_clear_error_before_any_kernel():
    with pytest.raises(CompressError, match=r"parameter 'bits' must be list\[int\], got str '4'"):
        run_notebook.execute("quantization_tradeoffs", {"bits": "4"})
    with pytest.raises(CompressError, match=r"parameter 'ratio' must be float, got bool True"):
        run_notebook.execute("stacking", {"ratio": True})
    with pytest.raises(CompressError, match="has no parameter 'bitz'"):
        run_notebook.execute("quantization_tradeoffs", {"bitz": [4]})
    with pytest.raises(CompressError, match="no notebook 'quantisation'"):
        run_notebook.execute("quantisation", {})


def test_runner_command_prints_one_error_line():
    done = subprocess.run([sys.executable, str(NOTEBOOKS / "run_notebook.py"), "pruning_tradeoffs", "-p", "ratios",
                           "twenty"], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: notebook pruning_tradeoffs: parameter 'ratios' must be list[float], got str 'twenty'"]


def test_the_notebook_itself_rejects_a_wrong_type():
    """Run by papermill directly (no runner check): the cell after the parameters stops the notebook
    with the same message, before any model is loaded."""
    import papermill
    from papermill.exceptions import PapermillExecutionError

    with pytest.raises(PapermillExecutionError) as caught:
        papermill.execute_notebook(run_notebook.read("quantization_tradeoffs"), None, parameters={"eval_windows": "4"},
                                   kernel_name="python3", cwd=str(NOTEBOOKS), progress_bar=False)
    assert caught.value.ename == "CompressError"
    assert "parameter 'eval_windows' must be int, got str '4'" in caught.value.evalue
