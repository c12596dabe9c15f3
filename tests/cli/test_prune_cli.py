"""`compress prune`: a working run on a tiny model, and one clear error line per bad input."""

from __future__ import annotations

import hashlib
import json

import pytest
import yaml

from compress.methods import make_config
from compress.methods.slimgpt.config import SlimGPTConfig
from tests.helpers import REPO, WIKI_TRAIN
from tests.helpers import assert_one_line_error, run_cli


def _digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def test_prune_writes_a_smaller_model_and_a_table(tiny_model_folder, tmp_path):
    before = _digest(tiny_model_folder)
    out = tmp_path / "pruned"
    result = run_cli("prune", tiny_model_folder, "--method", "slimgpt", "--ratio", 0.3, "--out", out,
                     "--data", WIKI_TRAIN, "--samples", 4, "--seqlen", 32, "--schedule", "uniform", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "parameters after" in result.stdout and "ffn" in result.stdout
    record = json.loads((out / "compress.json").read_text())
    assert record["parameters"]["after"] < record["parameters"]["before"]
    assert record["metrics"]["decoder_removed_fraction"] == pytest.approx(0.3, abs=0.03)
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"
    assert _digest(tiny_model_folder) == before  # the input is never modified


@pytest.mark.parametrize("ratio", [0, 1, 1.5, -0.2])
def test_ratio_outside_the_open_interval(tiny_model_folder, tmp_path, ratio):
    out = tmp_path / "out"
    result = run_cli("prune", tiny_model_folder, "--ratio", ratio, "--out", out)
    assert_one_line_error(result, "--ratio must be strictly between 0 and 1")
    assert not out.exists()


def test_ratio_that_would_empty_a_layer(tiny_model_folder, tmp_path):
    out = tmp_path / "out"
    result = run_cli("prune", tiny_model_folder, "--ratio", 0.9, "--schedule", "log", "--out", out)
    assert_one_line_error(result, "would be emptied")
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_model_that_is_not_llama_like(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=32)).save_pretrained(folder)
    out = tmp_path / "out"
    assert_one_line_error(run_cli("prune", folder, "--ratio", 0.2, "--out", out), "is not LLaMA-like")
    assert not out.exists()


def test_unknown_method(tiny_model_folder, tmp_path):
    assert_one_line_error(run_cli("prune", tiny_model_folder, "--method", "nope", "--ratio", 0.2, "--out",
                                  tmp_path / "o"), "unknown method 'nope'")


@pytest.mark.parametrize("name", ["llama3-8b-slimgpt-20.yaml", "smollm2-135m-slimgpt-20.yaml"])
def test_recipes_load_and_validate(name):
    recipe = yaml.safe_load((REPO / "recipes" / name).read_text())
    assert {"model", "data", "stages"} <= set(recipe)
    stages = recipe["stages"]
    assert [s["method"] for s in stages] == ["slimgpt"]
    config = make_config(SlimGPTConfig, stages[0]["options"], where=f"recipe {name}")
    assert config.ratio == 0.2 and config.schedule == "log"


def test_eval_measures_before_and_after_on_a_bounded_protocol(tiny_model_folder, tmp_path):
    out = tmp_path / "pruned"
    result = run_cli("prune", tiny_model_folder, "--ratio", 0.3, "--out", out, "--data", WIKI_TRAIN, "--samples", 4,
                     "--seqlen", 32, "--schedule", "uniform", "--device", "cpu", "--eval", "--eval-windows", 2)
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "compress.json").read_text())["metrics"]
    assert metrics["eval_seqlen"] == 128 and metrics["eval_windows"] == 2
    assert metrics["perplexity_before"] == metrics["before"]["perplexity"][0]["perplexity"]
    assert metrics["perplexity_after"] == metrics["perplexity"][0]["perplexity"] != metrics["perplexity_before"]
    assert metrics["perplexity"][0]["windows"] == 2 and "perplexity after (wikitext2 @ 128)" in result.stdout
