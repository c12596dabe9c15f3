"""`compress distill` on a tiny Llama: the output reloads with its record, a run killed in ILD or in KD
resumes to the same weights, and bad input is one line, exit code 2, nothing written."""

from __future__ import annotations

import json

import pytest
import torch

import compress
from compress.distill.config import DistillConfig
from compress.distill.run import Distillation
from compress.models import load_model
from tests.helpers import WIKI_TRAIN, assert_one_line_error, make_tiny_llama, run_cli
from tests.helpers.adapt import smollm2_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")
# 2 layers; windows of 32 tokens: 8 for ILD (2 batches of 4), 2 held out, 2 KD steps of 4 windows
SMALL = dict(seqlen=32, ild_tokens=256, smart_tokens=64, kd_tokens=256, batch_size=4, n_mla=1, save_every=1)


class Killed(Exception):
    pass


def flags(**settings) -> list:
    out = []
    for key, value in settings.items():
        out += [f"--{key.replace('_', '-')}", value]
    return out


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text(WIKI_TRAIN.read_text()[:40000])  # about 9k tokens: 280 windows of 32
    return path


def test_distill_writes_a_hybrid_that_reloads_with_its_record(tiny_model_folder, data, tmp_path):
    out = tmp_path / "zebra"
    result = run_cli("distill", tiny_model_folder, "--out", out, "--data", data, "--device", "cpu", *flags(**SMALL))
    assert result.exit_code == 0, (result.output, result.exception)
    assert "KV cache (% of the teacher's)" in result.output and "SMART sensitivity" in result.output
    assert "SMART: all-Mamba2 KL" in result.output  # printed as soon as SMART is done, before KD
    record = json.loads((out / "compress.json").read_text())
    assert record["format"] == "hybrid" and record["command"] == "distill"
    assert record["mla_layers"] == [0] and record["layer_types"] == ["mla", "mamba2"]  # K = 1: the first layer
    assert len(record["smart"]["sensitivity"]) == 2 and record["smart"]["chosen"] == [0]
    for layer in record["ild"]["layers"]:
        assert {"before", "after", "kept"} <= set(layer["mla"]) and {"before", "after"} <= set(layer["mamba2"])
    assert record["ild"]["tokens"] == 256 and record["kd"]["tokens"] == 256 and record["kd"]["steps"] == 2
    assert [s for s, _ in record["kd"]["eval_kl"]] == [0, 2]
    assert record["windows"]["kd_windows"] == 8 and record["kv_cache_fraction"] == pytest.approx(36 / 64)
    loaded = compress.load(str(out))
    assert type(loaded.model).__name__ == "ZebraLlamaForCausalLM" and loaded.tokenizer is not None
    assert (out / "modeling_zebra_llama.py").is_file() and "auto_map" in json.loads((out / "config.json").read_text())
    assert not (tmp_path / "zebra.partial").exists()  # the state folder is gone once the output is written


def test_cli_defaults_are_the_configs():
    from compress.cli.distill_cmd import distill_command

    defaults = DistillConfig()
    shared = [p for p in distill_command.params if hasattr(defaults, p.name)]
    assert len(shared) == len(vars(defaults))  # every setting is a flag
    for param in shared:
        assert param.default == getattr(defaults, param.name), param.name


def api_run(folder, data, out, **hooks):
    loaded = load_model(folder)
    config = DistillConfig(data=str(data), **SMALL)
    job = Distillation(loaded.model, loaded.tokenizer, config, out, source=str(folder), device="cpu", **hooks)
    return job, job.run()


@pytest.mark.parametrize("stage", ["ild", "kd"])
def test_a_killed_run_resumes_to_the_same_weights(stage, tiny_model_folder, data, tmp_path):
    _, reference = api_run(tiny_model_folder, data, tmp_path / "reference")

    def kill(step, *args):  # ILD: after layer 0 of 2 (walk.json says: next is layer 1); KD: after step 1 of 2
        if step == (0 if stage == "ild" else 1):
            raise Killed

    out = tmp_path / "zebra"
    with pytest.raises(Killed):
        api_run(tiny_model_folder, data, out, **({"on_layer_done": kill} if stage == "ild" else {"on_kd_step": kill}))
    state = tmp_path / "zebra.partial"
    kept = sorted(p.name for p in state.iterdir())
    assert ("walk-0-of-1" in kept) if stage == "ild" else ("kd" in kept and "smart.json" in kept)
    args = ["distill", tiny_model_folder, "--out", out, "--data", data, "--device", "cpu", *flags(**SMALL)]
    assert_one_line_error(run_cli(*args), "pass --resume to continue it")
    done = run_cli(*args, "--resume")
    assert done.exit_code == 0, (done.output, done.exception)
    resumed = compress.load(str(out)).model.state_dict()
    for name, value in reference.model.state_dict().items():
        assert torch.allclose(resumed[name], value, atol=1e-6, rtol=0), name
    losses = json.loads((out / "compress.json").read_text())["kd"]["train_losses"]
    assert [s for s, _ in losses] == [1, 2]
    assert [v for _, v in losses] == pytest.approx([v for _, v in reference.record["kd"]["train_losses"]], abs=1e-6)


@pytest.fixture
def other_tokenizer_model(tmp_path):
    """A Llama with the same vocabulary width but a different tokenizer."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    folder = tmp_path / "other"
    make_tiny_llama(vocab_size=49152, hidden_size=32, intermediate_size=48, num_hidden_layers=2).save_pretrained(folder)
    words = Tokenizer(models.WordLevel({"[UNK]": 0, "the": 1, "a": 2}, unk_token="[UNK]"))
    PreTrainedTokenizerFast(tokenizer_object=words, unk_token="[UNK]").save_pretrained(folder)
    return folder


@pytest.fixture
def same_tokenizer_wider_vocab(tmp_path):
    folder = tmp_path / "wider"
    make_tiny_llama(vocab_size=50000, hidden_size=32, intermediate_size=48, num_hidden_layers=2).save_pretrained(folder)
    smollm2_tokenizer().save_pretrained(folder)
    return folder


@pytest.mark.parametrize("change, match", [
    ({"n_mla": 3}, "--n-mla must be between 1 and the model's 2 layers, got 3"),
    ({"mla_layers": "0,2"}, "--mla-layers: layer 2 is out of range"),
    ({"mla_layers": "1,1"}, "--mla-layers: layer 1 is listed twice"),
    ({"mla_layers": "0", "n_mla": 2}, "--n-mla 2 does not match the 1 layers of --mla-layers"),
    ({"kd_tokens": 10_000_000}, "the token budgets need"),
    ({"ild_tokens": 10_000_000}, "the token budgets need"),
    ({"kd_tokens": 64}, "less than one KD step"),
    ({"ild_tokens": 16}, "--ild-tokens must be at least one window"),
    ({"kv_rank": 999}, "--kv-rank must be in 1..32"),
    ({"kd_teacher": "OTHER"}, "different tokenizer"),
    ({"kd_teacher": "WIDER"}, "50000 output tokens, the student 49152"),
])
def test_bad_input_is_one_line_and_writes_nothing(change, match, tiny_model_folder, data, tmp_path, request):
    settings = {**SMALL, **change}
    teachers = {"OTHER": "other_tokenizer_model", "WIDER": "same_tokenizer_wider_vocab"}
    if settings.get("kd_teacher") in teachers:
        settings["kd_teacher"] = request.getfixturevalue(teachers[settings["kd_teacher"]])
    before = sorted(p.name for p in tmp_path.iterdir())
    result = run_cli("distill", tiny_model_folder, "--out", tmp_path / "zebra", "--data", data, "--device", "cpu",
                     *flags(**settings))
    assert_one_line_error(result, match)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no output, no state folder


def test_a_recipe_stage_distills_and_exports_a_hybrid(tiny_model_folder, data, tmp_path):
    import yaml

    recipe = {"model": str(tiny_model_folder), "device": "cpu", "out": str(tmp_path / "zebra"),
              "stages": [{"method": "zebra-distill", "options": {"data": str(data), **SMALL}}]}
    path = tmp_path / "distill.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert run_cli("run", path, "--dry-run").exit_code == 0
    done = run_cli("run", path)
    assert done.exit_code == 0, (done.output, done.exception)
    record = json.loads((tmp_path / "zebra" / "compress.json").read_text())
    assert record["format"] == "hybrid" and record["stages"][0]["result"]["mla_layers"] == [0]
    assert record["stages"][0]["result"]["kd"]["steps"] == 2
    assert type(compress.load(str(tmp_path / "zebra")).model).__name__ == "ZebraLlamaForCausalLM"
    assert not (tmp_path / "zebra.partial").exists()
