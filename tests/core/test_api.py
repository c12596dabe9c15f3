"""The Python API (compress.load/prune/quantize/evaluate/save) and the CLI flags made from method
Config fields: the README's example end to end on a tiny model."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from click.testing import CliRunner

import compress
from compress.cli import main
from compress.errors import CompressError
from compress.methods.slimgpt.config import SlimGPTConfig
from tests.helpers import WIKI_TEST, WIKI_TRAIN


def test_readme_python_api_on_a_tiny_model(tiny_model_folder, tmp_path):
    m = compress.load(tiny_model_folder)
    pruned = compress.prune(m, method="slimgpt", data=str(WIKI_TRAIN), ratio=0.25, samples=4, seqlen=32,
                            schedule="uniform", ffn_multiple=16)
    assert pruned["decoder_removed_fraction"] == pytest.approx(0.25, abs=0.07)  # FFN moves in steps of 16 of 48
    quantized = compress.quantize(m, method="gptq", bits=4, group_size=16, data=str(WIKI_TRAIN), samples=4, seqlen=32)
    assert all("gptq" in layer for layer in quantized["records"])
    metrics = compress.evaluate(m, data=str(WIKI_TEST), seqlen=64, windows=2)
    folder = compress.save(m, tmp_path / "slim-w4")
    record = json.loads((folder / "compress.json").read_text())
    assert record["format"] == "compressed-tensors"  # the last stage's exporter, chosen by the registry
    assert [s["method"] for s in record["stages"]] == ["slimgpt", "gptq"]
    again = compress.evaluate(compress.load(folder), data=str(WIKI_TEST), seqlen=64, windows=2)
    assert again["perplexity"] == pytest.approx(metrics["perplexity"], rel=1e-4)  # what was saved is what was measured


def test_api_errors_name_the_problem(tiny_model_folder):
    m = compress.load(tiny_model_folder)
    with pytest.raises(CompressError, match="unknown method 'slimgtp'"):
        compress.prune(m, method="slimgtp", ratio=0.2)
    with pytest.raises(CompressError, match="not a prune method"):
        compress.prune(m, method="gptq", bits=4)
    with pytest.raises(CompressError, match="field 'ratio' must be strictly between 0 and 1"):
        compress.prune(m, ratio=1.2)


def test_prune_help_lists_every_slimgpt_config_field():
    result = CliRunner().invoke(main, ["prune", "--help"])
    assert result.exit_code == 0, result.output
    assert "One of: flap, shortgpt, slimgpt" in " ".join(result.output.split())  # --method lists the choices
    for field in dataclasses.fields(SlimGPTConfig):
        assert "--" + field.name.replace("_", "-") in result.output, field.name


def test_config_field_flags_reach_the_method(tiny_model_folder, tmp_path):
    out = tmp_path / "p"
    result = CliRunner().invoke(main, ["--quiet", "prune", str(tiny_model_folder), "--ratio", "0.3", "--out", str(out),
                                       "--data", str(WIKI_TRAIN), "--samples", "4", "--seqlen", "32",
                                       "--schedule", "uniform", "--damping", "0.05", "--ffn-multiple", "8",
                                       "--obs-dtype", "float32", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    config = json.loads((out / "compress.json").read_text())["config"]
    assert config["damping"] == 0.05 and config["ffn_multiple"] == 8 and config["obs_dtype"] == "float32"
    widths = json.loads((out / "config.json").read_text())["intermediate_size"]
    assert widths % 8 == 0


def test_a_flag_of_another_method_is_one_clear_error(tiny_model_folder, tmp_path):
    result = CliRunner().invoke(main, ["--quiet", "quantize", str(tiny_model_folder), "--method", "rtn",
                                       "--group-size", "16", "--damp", "0.1", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert result.stderr.strip() == "error: option --damp does not apply to method rtn"
    assert not (tmp_path / "o").exists()


def test_layer_kwargs_are_captured_per_layer(tiny_llama, tiny_tokens):
    """Each decoder layer gets its own call kwargs (a hybrid's layers may differ); shared tensors are
    held once, and layer 0's inputs equal the embeddings."""
    from compress.walk import capture_inputs

    inputs = capture_inputs(tiny_llama, tiny_tokens, torch.device("cpu"), batch_size=4)
    assert len(inputs.per_layer) == 3 and all(len(k) == 2 for k in inputs.per_layer)
    first, last = inputs.per_layer[0][0], inputs.per_layer[2][0]
    assert first["position_embeddings"][0] is last["position_embeddings"][0]
    with torch.no_grad():
        embedded = tiny_llama.model.embed_tokens(tiny_tokens[:4])
    assert torch.equal(inputs.hidden[0], embedded)
