"""`compress run RECIPE`: a stacked prune + quantize recipe end to end in one walk, the exported model
equal to the stages run directly, one clear error per malformed recipe, and every shipped recipe valid."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

import compress.walk
from compress.data import calibration_tokens
from compress.plugin import build_method
from compress.models import load_model
from compress.recipe import parse_recipe
from tests.helpers import REPO, WIKI_TEST, WIKI_TRAIN
from tests.helpers import assert_one_line_error, run_cli

# tiny_model_folder: hidden 32, 4 heads of 8 (2 KV heads), FFN 48, 2 layers. ffn_multiple 16 keeps FFN
# widths that group 16 divides; attention keeps 2 or 4 heads (16 or 32 columns of o_proj).
SLIM = {"ratio": 0.3, "schedule": "log", "min_scale": 0.25, "ffn_multiple": 16}
GPTQ = {"bits": 4, "group_size": 16, "sym": True, "act_order": True, "ignore": ["lm_head"]}
DATA = {"source": str(WIKI_TRAIN), "samples": 4, "seqlen": 32, "seed": 0}


def stacked_recipe(model, **extra) -> dict:
    recipe = {"model": str(model), "device": "cpu", "batch_size": 2, "data": dict(DATA),
              "stages": [{"method": "slimgpt", "options": dict(SLIM)}, {"method": "gptq", "options": dict(GPTQ)}],
              "export": {"format": "compressed-tensors"}}
    recipe.update(extra)
    return recipe


def write(path, recipe) -> str:
    text = "# a test recipe\n" + yaml.safe_dump(recipe, sort_keys=False)
    path.write_text(text)
    return text


def direct(folder):
    """The same two stages run directly: SlimGPT then GPTQ in one walk over the same calibration tokens."""
    loaded = load_model(folder)
    tokens = calibration_tokens(loaded.model, loaded.tokenizer, DATA["source"], DATA["samples"], DATA["seqlen"],
                                DATA["seed"])
    methods = [build_method("slimgpt", SLIM), build_method("gptq", GPTQ)]
    methods[0].prepare(loaded.model)
    compress.walk.walk(loaded.model, tokens, methods, device="cpu", batch_size=2)
    return loaded.model, tokens


def test_stacked_recipe_runs_in_one_walk_and_reloads(tiny_model_folder, tmp_path, monkeypatch):
    calls = []
    real_walk = compress.walk.walk

    def counting_walk(model, tokens, methods, **kwargs):
        calls.append([m.name for m in methods])
        return real_walk(model, tokens, methods, **kwargs)

    monkeypatch.setattr(compress.walk, "walk", counting_walk)
    out = tmp_path / "slim-w4"
    recipe_path = tmp_path / "stack.yaml"
    eval_section = {"perplexity": {"data": str(WIKI_TEST), "seqlen": 32, "windows": 2},
                    "fidelity": {"data": str(WIKI_TEST), "seqlen": 32, "windows": 2}}
    text = write(recipe_path, stacked_recipe(tiny_model_folder, out=str(out), eval=eval_section))
    result = run_cli("run", recipe_path)
    assert result.exit_code == 0, (result.output, result.exception)
    assert calls == [["slimgpt", "gptq"]]  # both stages, in order, in ONE walk
    assert "layer walk 1" in result.stdout and "perplexity" in result.stdout and "saved to" in result.stdout
    shared = [line for line in result.stdout.splitlines() if "layer walk 1" in line]
    assert len(shared) == 1 and "slimgpt → gptq" in shared[0]  # one walk, one row, its time once

    assert (out / "recipe.yaml").read_text() == text  # the exact YAML text beside the output
    record = json.loads((out / "compress.json").read_text())
    assert record["recipe"] == yaml.safe_load(text) and record["walks"] == 1 and record["format"] == "compressed-tensors"
    assert record["parameters"]["after"] < record["parameters"]["before"]
    assert any("slimgpt" in layer for layer in record["layers"]) and all("gptq" in layer for layer in record["layers"])
    assert record["metrics"]["perplexity"][0]["windows"] == 2 and record["metrics"]["fidelity"]["positions"] == 64
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"

    monkeypatch.setattr(compress.walk, "walk", real_walk)
    expected, tokens = direct(tiny_model_folder)
    reloaded = load_model(out).model
    widths = [layer.mlp.down_proj.in_features for layer in expected.model.layers]
    assert widths != [48, 48] and all(w % 16 == 0 for w in widths)
    assert [layer.mlp.down_proj.in_features for layer in reloaded.model.layers] == widths
    with torch.no_grad():
        a = expected(input_ids=tokens).logits
        b = reloaded(input_ids=tokens).logits
    assert (a - b).abs().max().item() <= 1e-4


def test_consecutive_layer_stages_share_a_walk_and_model_stages_split_it(tiny_model_folder):
    recipe = stacked_recipe(tiny_model_folder)
    recipe["stages"] += [{"method": "transfer", "options": {"source_base": "a", "source_ft": "b"}},
                         {"method": "rtn", "options": {"bits": 8, "group_size": 16}}]
    steps = parse_recipe(yaml.safe_dump(recipe)).steps()
    assert [[s.name for s in step] for step in steps] == [["slimgpt", "gptq"], ["transfer"], ["rtn"]]


def test_ffn_multiple_keeps_widths_a_group_size_divides():
    from compress.methods.slimgpt.plan import LayerShape, plan_model, removed_parameters

    smol = LayerShape(576, 9, 3, 64, 1536)  # smollm2-135m
    plain = plan_model([smol] * 30, 0.2, "log", 0.25, "query")
    assert any((smol.ffn - p.channels_removed) % 64 for p in plain)  # why the stacked recipe needs the option
    plans = plan_model([smol] * 30, 0.2, "log", 0.25, "query", ffn_multiple=64)
    assert all((smol.ffn - p.channels_removed) % 64 == 0 for p in plans)
    assert sum(removed_parameters(smol, p) for p in plans) / (30 * smol.prunable) == pytest.approx(0.2, abs=0.005)


def test_dry_run_prints_the_plan_and_writes_nothing(tiny_model_folder, tmp_path):
    out = tmp_path / "never"
    recipe_path = tmp_path / "r.yaml"
    write(recipe_path, stacked_recipe(tiny_model_folder, out=str(out)))
    result = run_cli("run", recipe_path, "--dry-run")
    assert result.exit_code == 0, result.output
    assert "slimgpt → gptq (one layer walk)" in result.stdout and "compressed-tensors" in result.stdout
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml", "tiny"]


@pytest.mark.parametrize("change, match", [
    (lambda r: r.update(colour="blue"), "unknown key 'colour'"),
    (lambda r: r.pop("model"), "'model' is missing"),
    (lambda r: r.update(stages={"method": "gptq"}), "'stages' must be a non-empty list"),
    (lambda r: r["stages"].append({"method": "sparsify"}), "unknown method 'sparsify'"),
    (lambda r: r["stages"][1]["options"].update(bitz=4), "field 'bitz'"),
    (lambda r: r["stages"][1]["options"].update(bits="four"), "field 'bits' must be an integer"),
    (lambda r: r["stages"][0]["options"].update(ratio=1.5), "field 'ratio' must be strictly between 0 and 1"),
    (lambda r: r["data"].update(samples="many"), "field 'samples' must be an integer"),
    (lambda r: r.update(export={"format": "onnx"}), "field 'format' must be one of"),
    (lambda r: r.update(eval={"perplexity": {"seqlen": 32, "window": 2}}), "unknown field 'window'"),
    (lambda r: r.update(dtype="int3"), "'dtype' must be one of"),
    (lambda r: r["stages"].append({"method": "bone", "options": {"r": 4}}), "method bone needs train_examples"),
])
def test_malformed_recipe_is_one_line_and_writes_nothing(tiny_model_folder, tmp_path, change, match):
    recipe = stacked_recipe(tiny_model_folder, out=str(tmp_path / "out"))
    change(recipe)
    recipe_path = tmp_path / "bad.yaml"
    write(recipe_path, recipe)
    assert_one_line_error(run_cli("run", recipe_path), match)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml", "tiny"]


@pytest.mark.parametrize("text, match", [("model: [unclosed", "is not valid YAML"), ("- a\n- b\n", "a recipe is a mapping"),
                                         ("model: x\nstages: []\n", "'stages' must be a non-empty list")])
def test_unparsable_recipe(tmp_path, text, match):
    recipe_path = tmp_path / "bad.yaml"
    recipe_path.write_text(text)
    assert_one_line_error(run_cli("run", recipe_path, "--out", tmp_path / "o"), match)
    assert not (tmp_path / "o").exists()


def test_output_checks_before_any_work(tiny_model_folder, tmp_path):
    recipe_path = tmp_path / "r.yaml"
    existing = tmp_path / "exists"
    existing.mkdir()
    write(recipe_path, stacked_recipe(tiny_model_folder, out=str(existing)))
    assert_one_line_error(run_cli("run", recipe_path), "already exists; pass --force")
    assert list(existing.iterdir()) == []
    write(recipe_path, stacked_recipe(tiny_model_folder))
    assert_one_line_error(run_cli("run", recipe_path), "no output folder")
    before = sorted(p.name for p in tiny_model_folder.iterdir())
    assert_one_line_error(run_cli("run", recipe_path, "--out", tiny_model_folder, "--force"), "would overwrite")
    assert sorted(p.name for p in tiny_model_folder.iterdir()) == before
    assert_one_line_error(run_cli("run", tmp_path / "missing.yaml"), "recipe not found")


def test_group_size_that_does_not_divide_a_pruned_width_is_a_clear_error(tiny_model_folder, tmp_path):
    recipe = stacked_recipe(tiny_model_folder, out=str(tmp_path / "out"))
    recipe["stages"][0]["options"].pop("ffn_multiple")  # the planner then keeps e.g. 41 of 48 FFN channels
    recipe_path = tmp_path / "r.yaml"
    write(recipe_path, recipe)
    assert_one_line_error(run_cli("run", recipe_path), "does not divide the input width")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                tie_word_embeddings=False)


@pytest.fixture(scope="module")
def llama3_8b_shapes(tmp_path_factory):
    """A folder with Llama-3-8B's config and a placeholder weights file: what a dry run reads (it
    builds the model's skeleton from the config and never loads the weights)."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    folder = tmp_path_factory.mktemp("llama3-8b-shapes")
    LlamaConfig(**LLAMA3_8B).save_pretrained(folder)
    save_file({"placeholder": torch.zeros(1)}, str(folder / "model.safetensors"))
    return folder


@pytest.mark.parametrize("path", sorted((REPO / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_validates(path, tmp_path, tmp_path_factory, monkeypatch, llama3_8b_shapes):
    monkeypatch.chdir(tmp_path)  # relative 'out' folders resolve (and are checked) here
    recipe = yaml.safe_load(path.read_text())
    if str(recipe["model"]).startswith("/models/"):  # a GPU box's Llama-3 folder: its shapes stand in for it
        recipe["model"] = str(llama3_8b_shapes)
        path = tmp_path_factory.mktemp("recipe") / path.name
        path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    result = run_cli("run", path, "--dry-run")
    assert result.exit_code == 0, (result.output, result.exception)
    assert "step 1" in result.stdout
    assert list(tmp_path.iterdir()) == []


def test_eval_settings_are_checked_before_the_walk(tiny_model_folder, tmp_path, monkeypatch):
    monkeypatch.setattr(compress.walk, "walk", lambda *a, **k: pytest.fail("walked before checking eval"))
    text = tmp_path / "short.txt"
    text.write_text("A short evaluation text of a few words.\n")
    recipe_path = tmp_path / "r.yaml"
    write(recipe_path, stacked_recipe(tiny_model_folder, out=str(tmp_path / "out"),
                                      eval={"perplexity": {"data": str(text), "seqlen": 4, "windows": 50}}))
    assert_one_line_error(run_cli("run", recipe_path), "--windows 50 asked for")
    assert not (tmp_path / "out").exists()


def test_gptq_format_and_out_flag_override(tiny_model_folder, tmp_path):
    recipe_path = tmp_path / "r.yaml"
    write(recipe_path, stacked_recipe(tiny_model_folder, out=str(tmp_path / "ignored"), export={"format": "gptq"}))
    out = tmp_path / "flag"
    result = run_cli("run", recipe_path, "--out", out, "--device", "cpu")
    assert result.exit_code == 0, (result.output, result.exception)
    assert not (tmp_path / "ignored").exists()
    assert json.loads((out / "quantize_config.json").read_text())["desc_act"] is True
    assert json.loads((out / "compress.json").read_text())["format"] == "gptq"
