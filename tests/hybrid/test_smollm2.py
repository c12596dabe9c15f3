"""A hybrid of the real smollm2-135m: 4 MLA layers + 26 Mamba2 (default ranks 384 / 128 / 32)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import compress
from compress.hybrid.build import hybridize
from compress.metrics.cost import kv_cache_bytes_per_token, kv_cache_fraction, ssm_state_bytes
from tests.helpers.hybrid import prefill_then_decode

REMOTE = """
import sys, torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True, dtype=torch.float32)
assert type(m).__module__.startswith("transformers_modules")
ids = torch.tensor([[int(t) for t in sys.argv[2].split(",")]])
with torch.no_grad():
    torch.save(m(input_ids=ids).logits, sys.argv[3])
"""


@pytest.mark.slow
def test_smollm2_hybrid_decodes_saves_reloads_and_generates(smollm2, tmp_path):
    torch.set_num_threads(2)
    hybrid = hybridize(smollm2.model, mla_layers=[0, 10, 20, 28])
    config = hybrid.config
    assert (config.q_lora_rank, config.kv_lora_rank, config.qk_rope_head_dim) == (384, 128, 32)
    assert config.layer_types.count("mla") == 4 and config.layer_types.count("mamba2") == 26
    ids = smollm2.tokenizer("The capital of France is Paris, and the capital of Italy is",
                            return_tensors="pt").input_ids
    # 9 tokens of prefill then token by token against one forward. MLA (expanded for the prefill, absorbed for
    # the decode) and attention in float64 are the same computation to round-off: 1e-9 of the logits' scale
    mla_only = hybridize(smollm2.model, mla_layers=[0, 10, 20, 28], mamba_layers=[]).double()
    with torch.no_grad():
        full64 = mla_only(input_ids=ids, use_cache=False).logits
    assert (prefill_then_decode(mla_only, ids, 9) - full64).abs().max() <= 1e-9 * full64.abs().max()
    del mla_only
    # Mamba2 runs its convolution, scan and state in float32 whatever the weights' dtype (the chunked scan and
    # the step recurrence sum in other orders): float32 agreement across 26 of them, 2e-5 of the scale
    hybrid.double()
    with torch.no_grad():
        full64 = hybrid(input_ids=ids, use_cache=False).logits
    assert (prefill_then_decode(hybrid, ids, 9) - full64).abs().max() <= 2e-5 * full64.abs().max()
    hybrid.float()  # exact: the weights were float32
    with torch.no_grad():
        full = hybrid(input_ids=ids, use_cache=False).logits
    assert (prefill_then_decode(hybrid, ids, 9) - full).abs().max() <= 1e-4 * full.abs().max()

    # KV cache: 4 · (128 + 32) / (30 · 3 · 64 · 2) = 640 / 11520, the published Zebra-Llama formula
    assert kv_cache_fraction(hybrid) == pytest.approx(4 * (128 + 32) / (30 * 3 * 64 * 2))
    assert kv_cache_bytes_per_token(hybrid) == 4 * 160 * 4
    assert ssm_state_bytes(hybrid) == 26 * ((3 * 64 + 3 * 64 + 9 * 64) * 3 * 4 + 9 * 64 * 64 * 4)

    out = tmp_path / "smollm2-zebra"
    compress.save(hybrid, out, tokenizer=smollm2.tokenizer)  # auto picks the hybrid format
    loaded = compress.load(str(out))
    with torch.no_grad():
        again = loaded.model(input_ids=ids).logits
    assert torch.equal(again, full)
    remote = tmp_path / "remote.pt"
    proc = subprocess.run([sys.executable, "-c", REMOTE, str(out), ",".join(map(str, ids[0].tolist())), str(remote)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert torch.equal(torch.load(remote), full)

    generated = loaded.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                                      pad_token_id=loaded.tokenizer.eos_token_id)
    text = loaded.tokenizer.decode(generated[0, ids.shape[1]:])
    assert generated.shape == (1, ids.shape[1] + 8) and isinstance(text, str)  # untrained: any text
