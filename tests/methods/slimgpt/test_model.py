"""SlimGPT on tiny Llamas through the walk: physically smaller layers that run, save and reload."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import compress
from compress.methods.slimgpt.method import model_shapes
from tests.helpers import make_tiny_llama

TOKENS = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(1))
PROMPT = TOKENS[:1, :6]


def _tiny():
    # 6 query heads in 2 KV groups of 3 (GQA like SmolLM2's 9 in 3), head_dim 8
    return make_tiny_llama(num_hidden_layers=4, hidden_size=48, num_attention_heads=6, num_key_value_heads=2,
                           intermediate_size=128)


def _logits(model, ids=TOKENS):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def _greedy_without_cache(model, ids, steps):
    for _ in range(steps):
        nxt = _logits(model, ids)[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
    return ids


@pytest.mark.parametrize("unit", ["query", "kv"])
def test_pruned_layers_shrink_and_generate_with_kv_cache(unit):
    model = _tiny()
    summary = compress.prune(model, tokens=TOKENS, ratio=0.4, schedule="log", gqa_unit=unit, device="cpu",
                             batch_size=4)
    shapes = model_shapes(model)
    assert [s.heads for s in shapes] == [layer["heads"] for layer in summary["layers"]]
    for layer, shape in zip(model.model.layers, shapes):
        assert shape.heads % shape.kv_heads == 0
        assert layer.self_attn.num_key_value_groups == shape.heads // shape.kv_heads
    if unit == "query":
        assert {s.kv_heads for s in shapes} == {2}
    assert min(s.heads for s in shapes) < 6 and min(s.ffn for s in shapes) < 128
    assert summary["parameters"]["decoder_after"] < summary["parameters"]["decoder_before"]
    assert torch.isfinite(_logits(model)).all()
    cached = model.generate(PROMPT, max_new_tokens=6, do_sample=False, use_cache=True)
    assert torch.equal(cached, _greedy_without_cache(model, PROMPT, 6))


def test_realised_ratio_is_close_to_the_target():
    model = _tiny()
    summary = compress.prune(model, tokens=TOKENS, ratio=0.3, schedule="uniform", device="cpu")
    # decoder layers also hold two norms (2·48 of ~38k parameters per layer)
    assert summary["decoder_removed_fraction"] == pytest.approx(0.3, abs=0.01)


def test_uniform_output_reloads_with_stock_from_pretrained(tmp_path):
    from transformers import LlamaForCausalLM

    model = _tiny()
    compress.prune(model, tokens=TOKENS, ratio=0.3, schedule="uniform", device="cpu")
    expected = _logits(model)
    out = compress.save(model, tmp_path / "uniform", record={"test": True})
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and "auto_map" not in config
    assert not (out / "modeling_compress_llama.py").exists()
    reloaded = LlamaForCausalLM.from_pretrained(str(out)).eval()
    assert reloaded.config.num_attention_heads == model_shapes(model)[0].heads
    assert torch.allclose(_logits(reloaded), expected, atol=1e-5, rtol=0)


REMOTE = """
import sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
assert 'compress' not in sys.modules, 'the remote code must not need the compress package'
ids = torch.load(sys.argv[2])
with torch.no_grad():
    logits = model(input_ids=ids, use_cache=False).logits
gen = model.generate(ids[:1, :6], max_new_tokens=6, do_sample=False, use_cache=True)
torch.save({'logits': logits, 'generated': gen, 'module': type(model).__module__}, sys.argv[3])
"""


def test_non_uniform_output_reloads_through_the_package_and_remote_code(tmp_path):
    from compress.models import load_model

    model = _tiny()
    compress.prune(model, tokens=TOKENS, ratio=0.4, schedule="log", device="cpu")
    expected = _logits(model)
    expected_gen = model.generate(PROMPT, max_new_tokens=6, do_sample=False, use_cache=True)
    out = compress.save(model, tmp_path / "log", record={"test": True})
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and config["auto_map"]
    assert len(set(config["layer_num_attention_heads"])) > 1 or len(set(config["layer_intermediate_size"])) > 1

    loaded = load_model(out, tokenizer=False).model  # no remote code: the package registers the classes
    assert (_logits(loaded) - expected).abs().max().item() <= 1e-5
    assert torch.equal(loaded.generate(PROMPT, max_new_tokens=6, do_sample=False, use_cache=True), expected_gen)

    torch.save(TOKENS, tmp_path / "ids.pt")
    script = tmp_path / "remote.py"
    script.write_text(REMOTE)
    # a fresh interpreter, outside the repository, so only the saved modeling file can build the model
    subprocess.run([sys.executable, str(script), str(out), str(tmp_path / "ids.pt"), str(tmp_path / "res.pt")],
                   check=True, cwd=tmp_path, timeout=300)
    remote = torch.load(tmp_path / "res.pt")
    assert remote["module"].startswith("transformers_modules")
    assert (remote["logits"] - expected).abs().max().item() <= 1e-5
    assert torch.equal(remote["generated"], expected_gen)
