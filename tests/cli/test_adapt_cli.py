"""``compress adapt`` end to end on a tiny random Llama: outputs, merged logits, bad input."""

import json

import pytest
import torch
from click.testing import CliRunner

from compress.cli import main
from tests.helpers.adapt import reverse_task, save_tiny_model, write_jsonl


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is faster on a shared CPU


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def task_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "reverse.jsonl", reverse_task(40, seed=5))


def adapt(*args):
    return CliRunner().invoke(main, ["--quiet", "adapt", *map(str, args)])


@pytest.mark.parametrize("method,r", [("bone", 8), ("bat", 8), ("lora", 4)])
def test_merged_weights_give_the_adapters_logits(tmp_path, tiny_folder, task_file, method, r):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    result = adapt(tiny_folder, "--method", method, "--r", r, "--data", task_file, "--out", out, "--merge",
                   "--steps", 3, "--lr", 2e-2, "--batch-size", 4, "--seqlen", 64)
    assert result.exit_code == 0, result.output + str(result.exception)
    ids = torch.randint(0, 49152, (2, 12), generator=torch.Generator().manual_seed(0))
    base = AutoModelForCausalLM.from_pretrained(tiny_folder).eval()
    with torch.no_grad():
        base_logits = base(ids).logits
        unmerged = PeftModel.from_pretrained(base, out / "adapter").eval()
        adapter_logits = unmerged(ids).logits
        merged_logits = AutoModelForCausalLM.from_pretrained(out).eval()(ids).logits  # stock transformers
    assert (adapter_logits - base_logits).abs().max() > 1e-3  # the adapter changed the model
    # float32: merging only reorders the same sums; measured differences are ~1e-6.
    assert torch.allclose(merged_logits, adapter_logits, atol=1e-4, rtol=1e-4)
    record = json.loads((out / "compress.json").read_text())
    assert record["method"] == method and record["output"] == "merged"
    assert len(record["metrics"]["train_losses"]) == 3
    assert record["metrics"]["final_eval_loss"] == record["metrics"]["eval_losses"][-1][1]
    assert record["train"]["eval_examples"] == 2  # 5% of 40


def test_adapter_output_without_merge(tmp_path, tiny_folder, task_file):
    out = tmp_path / "out"
    result = adapt(tiny_folder, "--method", "bone", "--r", 8, "--data", task_file, "--out", out, "--steps", 1,
                   "--batch-size", 2)
    assert result.exit_code == 0, result.output
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "MISS" and config["r"] == 8 and config["init_weights"] is True
    assert (out / "adapter_model.safetensors").is_file() and not (out / "model.safetensors").exists()


def assert_clean_failure(result, out, *fragments):
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0]
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]  # no temp folder left


def test_malformed_line_names_its_line_number(tmp_path, tiny_folder):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"instruction": "a", "response": "b"}\n\n{"instruction": "c", "response": \n')
    out = tmp_path / "out"
    assert_clean_failure(adapt(tiny_folder, "--method", "bone", "--r", 8, "--data", data, "--out", out),
                         out, "bad.jsonl:3:", "not valid JSON")


def test_line_without_a_response_names_its_line_number(tmp_path, tiny_folder):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"instruction": "a", "response": "b"}\n{"instruction": "c"}\n')
    out = tmp_path / "out"
    assert_clean_failure(adapt(tiny_folder, "--method", "bat", "--r", 8, "--data", data, "--out", out),
                         out, "bad.jsonl:2:", "missing field 'response'")


def test_empty_data_file(tmp_path, tiny_folder):
    data = tmp_path / "empty.jsonl"
    data.write_text("")
    out = tmp_path / "out"
    assert_clean_failure(adapt(tiny_folder, "--method", "lora", "--r", 4, "--data", data, "--out", out),
                         out, "empty")


def test_r_larger_than_the_width(tmp_path, tiny_folder, task_file):
    out = tmp_path / "out"
    assert_clean_failure(adapt(tiny_folder, "--method", "bone", "--r", 48, "--data", task_file, "--out", out),
                         out, "--r 48 is larger than the input width 32")


def test_bat_r_not_dividing_the_width(tmp_path, tiny_folder, task_file):
    out = tmp_path / "out"
    assert_clean_failure(adapt(tiny_folder, "--method", "bat", "--r", 6, "--data", task_file, "--out", out),
                         out, "--r 6 does not divide")
