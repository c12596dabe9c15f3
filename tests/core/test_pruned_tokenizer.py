"""A pruned output with per-layer widths: stock AutoTokenizer reads its tokenizer without remote code,
without the "run the custom code?" prompt and without a model-type mismatch warning; the model class
still comes from the folder's modeling file (trust_remote_code=True) and from compress.load."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

from tests.helpers import WIKI_TRAIN, run_cli

SCRIPT = """
import sys
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1])
print("ids", tok("Hello world", add_special_tokens=False)["input_ids"])
assert "compress" not in sys.modules and not any(m.startswith("transformers_modules") for m in sys.modules)
print("--- model", file=sys.stderr, flush=True)
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)
print("class", type(model).__name__, [layer.mlp.down_proj.in_features for layer in model.model.layers])
"""


def _python(code: str, *args) -> subprocess.CompletedProcess:
    """A fresh interpreter outside the repository (no compress import), stdin closed."""
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], cwd="/", stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})


def test_plain_autotokenizer_reads_a_per_layer_output(tiny_model_folder, smollm2_tokenizer, tmp_path, one_thread):
    out = tmp_path / "pruned"
    result = run_cli("prune", tiny_model_folder, "--method", "slimgpt", "--ratio", 0.4, "--schedule", "log",
                     "--data", WIKI_TRAIN, "--samples", 4, "--seqlen", 32, "--device", "cpu", "--out", out)
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    assert len(set(config["layer_intermediate_size"])) > 1 and (out / "modeling_compress_llama.py").is_file()

    run = _python(SCRIPT, out)  # the tokenizer first, then the model through the folder's modeling file
    assert run.returncode == 0, run.stderr
    tokenizer_err, model_err = run.stderr.split("--- model\n")
    expected = smollm2_tokenizer("Hello world", add_special_tokens=False)["input_ids"]
    assert f"ids {expected}" in run.stdout
    for text in ("custom code", "[y/N]", "trust_remote_code", "model of type"):
        assert text not in run.stdout + tokenizer_err, run.stdout + tokenizer_err
    assert f"class CompressLlamaForCausalLM {config['layer_intermediate_size']}" in run.stdout
    assert "model of type" not in model_err, model_err

    import compress

    loaded = compress.load(str(out))
    assert type(loaded.model).__name__ == "CompressLlamaForCausalLM" and loaded.tokenizer is not None
    assert [layer.mlp.down_proj.in_features for layer in loaded.model.model.layers] == config["layer_intermediate_size"]
    assert torch.isfinite(loaded.model(input_ids=torch.tensor([expected])).logits).all()
