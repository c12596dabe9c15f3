"""The study notebooks (notebooks/*.py, paired .ipynb): each runs top to bottom in a fresh kernel,
writes a PNG with content and numbers that hold up against independent checks; a bad parameter is one
clear error.

The runs take each notebook's defaults except the model, a tiny random Llama with the smollm2 tokenizer
(built here; the defaults target smollm2-135m), and the sizes in ``SMALL``, so that the five together
take 160–195 s on a shared 2-core CPU. The real-model numbers come from running the
notebooks with their defaults (``notebooks/results/``).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from compress.errors import CompressError
from tests.helpers import REPO
from tests.helpers.adapt import save_tiny_model

NOTEBOOKS = REPO / "notebooks"
sys.path.insert(0, str(NOTEBOOKS))
import run_notebook  # noqa: E402  (notebooks/run_notebook.py: how the tests and users execute a notebook)

EXPECTED = ["adapters", "pruning_tradeoffs", "quantization_tradeoffs", "search", "stacking", "transfer"]
SMALL = {  # on the tiny model (hidden 32: group sizes of 16; FFN 64, KV width 16: Bat blocks of 8)
    "quantization_tradeoffs": {"bits": [2, 4, 8], "group_size": 16, "group_sizes": [-1], "eval_windows": 2},
    "pruning_tradeoffs": {"calib_samples": 4, "eval_windows": 2},
    "stacking": {"group_size": 16, "calib_samples": 4, "eval_windows": 2},
    "transfer": {"scales": [0.0, 0.5, 1.0], "ranks": [1, 32], "v2_steps": 10, "ft_steps": 10},
    "search": {"ffn_step": 16, "calib_samples": 4, "eval_windows": 2, "population": 4, "generations": 1},
    "adapters": {"r": 8, "steps": 10, "eval_every": 5, "train_pairs": 64, "eval_pairs": 8, "batch_size": 4},
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("notebooks") / "tiny")


def execute(name, tiny, tmp_path, **extra):
    out = tmp_path / "results"
    run_notebook.execute(name, {"model": str(tiny), "out_dir": str(out), **SMALL[name], **extra})
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
def test_quantization_tradeoffs(tiny, tmp_path):
    out, results = execute("quantization_tradeoffs", tiny, tmp_path, work_dir=str(tmp_path / "work"))
    assert_png_has_content(out / "quantization_tradeoffs.png")
    rows = results["rows"]
    assert {(r["method"], r["bits"], r["group_size"]) for r in rows} == \
        {(m, b, 16) for m in ("rtn", "gptq") for b in (2, 4, 8)} | {("rtn", 4, -1), ("gptq", 4, -1)}
    assert results["float"]["perplexity"] == pytest.approx(hf_perplexity(tiny, 256, 2), rel=1e-4)
    for r in rows:
        folder = tmp_path / "work" / f"{r['method']}-w{r['bits']}-g{r['group_size']}"
        assert r["bytes_on_disk"] == sum(p.stat().st_size for p in folder.glob("*.safetensors"))
        if r["group_size"] > 0:  # packed codes + one float32 scale per group of 16 (symmetric: no zero point)
            assert r["bits_per_weight"] == pytest.approx(r["bits"] + 32 / 16, abs=1e-9)
    for method in ("rtn", "gptq"):
        by_bits = {r["bits"]: r for r in rows if r["method"] == method and r["group_size"] == 16}
        assert by_bits[2]["kl_divergence"] > by_bits[4]["kl_divergence"] > by_bits[8]["kl_divergence"]
        assert by_bits[8]["kl_divergence"] < 1e-3 and by_bits[8]["top1_agreement"] >= 0.98
        assert by_bits[2]["bytes_on_disk"] < by_bits[4]["bytes_on_disk"] < by_bits[8]["bytes_on_disk"]


@pytest.mark.slow
def test_pruning_tradeoffs(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    out, results = execute("pruning_tradeoffs", tiny, tmp_path)
    assert_png_has_content(out / "pruning_tradeoffs.png")
    rows = results["rows"]
    dense = rows[0]
    assert dense["method"] == "dense"
    assert dense["parameters"] == AutoModelForCausalLM.from_pretrained(tiny).num_parameters()
    assert dense["perplexity"] == pytest.approx(hf_perplexity(tiny, 256, 2), rel=1e-4)
    methods = ["slimgpt-log", "slimgpt-uniform", "slimgpt-global", "flap", "shortgpt", "magnitude", "wanda-sp"]
    assert [(r["method"], r["ratio"]) for r in rows[1:]] == [(m, q) for q in (0.2, 0.4) for m in methods]
    for r in rows[1:]:
        assert r["parameters"] < dense["parameters"] and math.isfinite(r["perplexity"])
        assert r["prefill_tokens_per_s"] > 0
        if r["method"] in ("slimgpt-log", "slimgpt-uniform", "magnitude", "wanda-sp"):  # follow the plan exactly
            assert r["decoder_removed"] == pytest.approx(r["ratio"], abs=0.01), r
    for m in methods:
        at = {r["ratio"]: r for r in rows if r["method"] == m}
        assert at[0.4]["parameters"] <= at[0.2]["parameters"]


@pytest.mark.slow
def test_search(tiny, tmp_path):
    """The search notebook: a front, the three pruning methods at the budget scored on the same tokens, and
    the exported member at the budget scores what its candidate scored in the search (the export is the
    candidate: same KL on the calibration tokens)."""
    out, results = execute("search", tiny, tmp_path)
    assert_png_has_content(out / "search.png")
    front, points, rows = results["front"], results["points"], results["rows"]
    assert front and [r["params"] for r in front] == sorted(r["params"] for r in front)
    assert [p["label"] for p in points] == ["slimgpt-log", "flap", "shortgpt", "search+none", "search+slimgpt"]
    member = min((r for r in front if r["params"] <= 0.7 + 1e-12), key=lambda r: r["kl"])
    plain = next(p for p in points if p["label"] == "search+none")
    # float32 log-softmax over 49152 logits, the search's parent reordered vs this one not: ~1e-9 apart
    assert plain["kl"] == pytest.approx(member["kl"], abs=2e-8)
    assert plain["params"] == pytest.approx(member["params"], abs=1e-12)
    assert all(math.isfinite(r["perplexity"]) for r in rows) and rows[0]["row"] == "parent"
    for p in points[:3]:  # the pruning methods removed about 30% of the decoder parameters
        assert p["params"] < 1.0 and p["kl"] > 0


@pytest.mark.slow
def test_stacking(tiny, tmp_path):
    out, results = execute("stacking", tiny, tmp_path)
    assert_png_has_content(out / "stacking.png")
    assert_png_has_content(out / "stacking_compare.png")
    rows = {r["model"]: r for r in results["rows"]}
    pruned, w4, w3, stacked = (rows[k] for k in ("slimgpt-0.25", "gptq-w4", "gptq-w3", "slimgpt-0.25+gptq-w4"))
    assert stacked["walks"] == 1  # prune and quantize in one walk
    assert stacked["parameters"] == pruned["parameters"] < w4["parameters"]  # the same SlimGPT plan
    assert stacked["bytes_on_disk"] < w4["bytes_on_disk"] and w3["bytes_on_disk"] < w4["bytes_on_disk"]
    assert results["float"]["perplexity"] == pytest.approx(hf_perplexity(tiny, 256, 2), rel=1e-4)
    compared = results["compare"]
    assert compared["warnings"] == [] and len(compared["rows"]) == 4
    for row in compared["rows"]:  # compress compare read the same numbers the jobs returned
        assert row["perplexity"]["value"] == pytest.approx(rows[row["output"]]["perplexity"], rel=1e-12)
        assert row["bytes_on_disk"] == rows[row["output"]]["bytes_on_disk"]


@pytest.mark.slow
def test_transfer(tiny, tmp_path):
    out, results = execute("transfer", tiny, tmp_path)
    assert_png_has_content(out / "transfer.png")
    by_scale = {r["scale"]: r for r in results["by_scale"]}
    by_rank = {r["rank"]: r for r in results["by_rank"]}
    v2 = results["versions"]["v2"]
    # λ = 0 leaves v2 as it was; a rank-32 diff is the whole diff of every matrix (no width exceeds 32
    # on both sides); both through the float64 arithmetic of the transfer
    assert by_scale[0.0]["perplexity"] == pytest.approx(v2["perplexity"], rel=1e-6)
    assert by_scale[0.0]["accuracy"] == v2["accuracy"]
    assert by_rank[32]["perplexity"] == pytest.approx(by_scale[1.0]["perplexity"], rel=1e-5)
    assert by_scale[1.0]["perplexity"] != pytest.approx(v2["perplexity"], rel=1e-6)  # Δ did something
    assert len(results["v2_losses"]) == 10 and len(results["ft_losses"]) == 10


@pytest.mark.slow
def test_adapters(tiny, tmp_path):
    out, results = execute("adapters", tiny, tmp_path)
    assert_png_has_content(out / "adapters.png")
    # the tiny model's projections, per layer: out widths q 32, k 16, v 16, o 32, gate 64, up 64, down 32;
    # in widths 32 except down (64). Bone/Bat train r × out, LoRA rank × (in + out): equal at r 8 / rank 4
    outs, ins, layers = [32, 16, 16, 32, 64, 64, 32], [32, 32, 32, 32, 32, 32, 64], 2
    runs = {r["method"]: r for r in results["runs"]}
    assert runs["bone"]["trainable_parameters"] == runs["bat"]["trainable_parameters"] == 8 * sum(outs) * layers
    assert runs["lora"]["r"] == 4
    assert runs["lora"]["trainable_parameters"] == 4 * sum(o + i for o, i in zip(outs, ins)) * layers
    for run in runs.values():
        assert [s for s, _ in run["eval_losses"]] == [0, 5, 10] and len(run["train_losses"]) == 10
        assert run["eval_losses"][-1][1] < run["eval_losses"][0][1]  # it learns


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
