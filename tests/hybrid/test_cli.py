"""`compress hybridize`, the hybrid exporter, reload both ways, `compress eval --cost` and bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import compress
from tests.helpers import WIKI_TEST, assert_one_line_error, make_tiny_llama, run_cli

IDS = torch.randint(0, 1000, (1, 14), generator=torch.Generator().manual_seed(2))
REMOTE = """
import sys, torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True, dtype=torch.float32)
assert type(m).__module__.startswith("transformers_modules"), type(m).__module__
ids = torch.tensor([[int(t) for t in sys.argv[2].split(",")]])
with torch.no_grad():
    torch.save(m(input_ids=ids).logits, sys.argv[3])
g = m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False, pad_token_id=0)
assert g.shape == (1, ids.shape[1] + 3)
"""


def remote_logits(folder, ids, tmp_path):
    """Logits of ``from_pretrained(folder, trust_remote_code=True)`` in a fresh process (no compress import)."""
    out = tmp_path / "remote.pt"
    proc = subprocess.run([sys.executable, "-c", REMOTE, str(folder), ",".join(map(str, ids[0].tolist())), str(out)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out)


@pytest.fixture
def hybrid_folder(tmp_path, tiny_model_folder):
    out = tmp_path / "hybrid"
    result = run_cli("hybridize", tiny_model_folder, "--mla-layers", "0", "--out", out)
    assert result.exit_code == 0, (result.output, result.exception)
    assert "KV cache: 56.25%" in result.output  # 1 · (32 + 4) / (2 layers · 2 KV heads · 8 · 2)
    return out


def test_hybridize_saves_config_and_reloads_both_ways(hybrid_folder, tmp_path):
    config = json.loads((hybrid_folder / "config.json").read_text())
    assert config["model_type"] == "zebra_llama" and config["layer_types"] == ["mla", "mamba2"]
    assert (config["q_lora_rank"], config["kv_lora_rank"], config["qk_rope_head_dim"]) == (32, 32, 4)
    assert (config["qk_nope_head_dim"], config["v_head_dim"]) == (4, 8)
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_zebra_llama.ZebraLlamaForCausalLM"
    record = json.loads((hybrid_folder / "compress.json").read_text())
    assert record["format"] == "hybrid" and record["kv_cache_fraction"] == pytest.approx(36 / 64)
    loaded = compress.load(str(hybrid_folder))
    assert type(loaded.model).__module__ == "compress.hybrid.modeling_zebra_llama" and loaded.tokenizer is not None
    with torch.no_grad():
        local = loaded.model(input_ids=IDS).logits
    assert torch.equal(remote_logits(hybrid_folder, IDS, tmp_path), local)  # identical logits


def test_eval_cost_reports_the_kv_fraction_and_ssm_state(hybrid_folder):
    done = run_cli("eval", hybrid_folder, "--data", WIKI_TEST, "--seqlen", 32, "--windows", 1, "--cost", "--json")
    assert done.exit_code == 0, (done.output, done.exception)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["kv_cache_fraction"] == pytest.approx(1 * (32 + 4) / (2 * 2 * 8 * 2))  # n_MLA (r+d_rope)/(L n_kv d 2)
    assert result["kv_cache_bytes_per_token"] == (32 + 4) * 4
    conv_dim = 2 * 8 + 2 * 8 + 4 * 8  # x | B | C of the one Mamba2 layer (head_dim 8)
    assert result["ssm_state_bytes"] == conv_dim * 3 * 4 + 4 * 8 * 8 * 4
    assert result["perplexity"] > 1


def test_plain_models_keep_their_cost_keys():
    from compress.metrics.cost import measure_cost

    keys = set(measure_cost(make_tiny_llama(), prefill_len=8, decode_steps=2).as_dict())
    assert "kv_cache_fraction" not in keys and "ssm_state_bytes" not in keys


@pytest.mark.parametrize("args, match", [
    (["--mla-layers", "0", "--kv-rank", "33"], "--kv-rank must be in 1..32"),
    (["--mla-layers", "0", "--q-rank", "64"], "--q-rank must be in 1..32"),
    (["--mla-layers", "0", "--rope-dim", "8"], "--rope-dim must be even"),
    (["--mla-layers", "0,2"], "layer 2 is out of range"),
    (["--mla-layers", "0", "--mamba-layers", "0,1"], "layer 0 is in both"),
    (["--mla-layers", "x"], "'x' is not a layer index"),
])
def test_bad_input_is_one_line_and_writes_nothing(tiny_model_folder, tmp_path, args, match):
    out = tmp_path / "never"
    assert_one_line_error(run_cli("hybridize", tiny_model_folder, *args, "--out", out), match)
    assert not out.exists() and not list(tmp_path.glob(".tmp*"))


def test_a_non_llama_model_is_refused(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    folder, out = tmp_path / "gpt2", tmp_path / "never"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=32)).save_pretrained(folder)
    assert_one_line_error(run_cli("hybridize", folder, "--mla-layers", "0", "--out", out), "is not LLaMA-like")
    assert not out.exists()
