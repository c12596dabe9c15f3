"""Quantized checkpoints: stock transformers reloads compressed-tensors exactly; GPTQ v1 unpacks exactly."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from compress.plugin import build_method
from compress.methods.quantize.config import RTNConfig
from compress.methods.quantize.export import gptq_quantize_config, quantized_linears, save_compressed_tensors, save_gptq
from compress.methods.quantize.grid import rtn_quantize
from compress.methods.quantize.pack import pack_int32, unpack_int32
from compress.walk import walk
from tests.helpers import make_tiny_llama

TOKENS = torch.randint(0, 128, (4, 24), generator=torch.Generator().manual_seed(2))


def quantized_tiny(method="gptq", **options):
    model = make_tiny_llama()
    walk(model, TOKENS, [build_method(method, options)], batch_size=4)
    return model


@pytest.mark.parametrize("options", [
    {"bits": 4, "group_size": 32, "sym": True, "act_order": True},  # pack-quantized
    {"bits": 3, "group_size": 32, "sym": False},  # naive-quantized (asymmetric)
    {"bits": 8, "group_size": -1, "sym": True},  # per channel
    {"bits": 2, "group_size": 16, "sym": True},
])
def test_compressed_tensors_reloads_with_stock_transformers(tmp_path, options):
    from transformers import AutoModelForCausalLM

    model = quantized_tiny(**options)
    with torch.no_grad():
        ours = model(TOKENS).logits
    out = save_compressed_tensors(model, None, tmp_path / "q", {"test": True})
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors"
    assert config["format"] == ("pack-quantized" if options["sym"] else "naive-quantized")
    assert config["ignore"] == ["lm_head"]
    reloaded = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = reloaded(TOKENS).logits
    assert (theirs - ours).abs().max().item() <= 1e-4
    if options["sym"]:  # codes are packed: 32 codes of b bits in b int32 words
        packed = load_file(str(out / "model.safetensors"))["model.layers.0.mlp.down_proj.weight_packed"]
        assert packed.dtype == torch.int32 and packed.shape == (64, 96 * options["bits"] // 32)


def reference_unpack(qweight: torch.Tensor, bits: int, rows: int) -> torch.Tensor:
    """Bit by bit, in plain Python: code k of a column is bits [k·b, (k+1)·b) of its word stream."""
    words = [[int(v) & 0xFFFFFFFF for v in row] for row in qweight.tolist()]
    cols = len(words[0])
    out = torch.zeros(rows, cols, dtype=torch.int64)
    for c in range(cols):
        for k in range(rows):
            value = 0
            for bit in range(bits):
                position = k * bits + bit
                value |= ((words[position // 32][c] >> (position % 32)) & 1) << bit
            out[k, c] = value
    return out


@pytest.mark.parametrize("bits,group_size", [(2, 16), (3, 32), (4, 32), (8, -1)])
def test_gptq_format_reference_unpacker_reproduces_weights(tmp_path, bits, group_size):
    model = quantized_tiny(bits=bits, group_size=group_size, sym=False, act_order=True)
    out = save_gptq(model, None, tmp_path / "g", {"test": True}, act_order=True)
    tensors = load_file(str(out / "model.safetensors"))
    qconfig = json.loads((out / "quantize_config.json").read_text())
    assert (qconfig["bits"], qconfig["group_size"], qconfig["desc_act"]) == (bits, group_size, True)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "gptq"
    for name, (module, params) in quantized_linears(model).items():
        out_features, in_features = module.weight.shape
        codes = reference_unpack(tensors[f"{name}.qweight"], bits, in_features)  # (in, out)
        zeros = reference_unpack(tensors[f"{name}.qzeros"].t().contiguous(), bits, out_features).t() + 1  # v1: z − 1
        scales = tensors[f"{name}.scales"].float()  # (groups, out), float16 on disk
        g_idx = tensors[f"{name}.g_idx"].long()
        weight = ((codes - zeros[g_idx]).float() * scales[g_idx]).t()  # (out, in)
        assert torch.equal(codes.t(), params.codes.long()), name
        assert torch.equal(weight, module.weight.detach()), name  # exact: scales are float16-representable


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_int32_round_trip(bits):
    codes = torch.randint(0, 2 ** bits, (64, 5), generator=torch.Generator().manual_seed(bits))
    packed = pack_int32(codes, bits, dim=0)
    assert packed.shape == (64 * bits // 32, 5) and packed.dtype == torch.int32
    assert torch.equal(unpack_int32(packed, bits, 64, dim=0), codes)
    assert torch.equal(reference_unpack(packed, bits, 64), codes)


@pytest.mark.slow
def test_smollm2_compressed_tensors_reload_matches_in_memory(tmp_path):
    from transformers import AutoModelForCausalLM

    from compress.models import load_model

    loaded = load_model("smollm2-135m", tokenizer=False)
    tokens = torch.randint(0, 49152, (1, 32), generator=torch.Generator().manual_seed(0))
    walk(loaded.model, tokens[:, :8], [build_method("rtn", {"bits": 4, "group_size": 64})])  # data-free
    with torch.no_grad():
        ours = loaded.model(tokens).logits
    out = save_compressed_tensors(loaded.model, None, tmp_path / "q", {"test": True})
    reloaded = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = reloaded(tokens).logits
    assert (theirs - ours).abs().max().item() <= 1e-4


def test_gptq_quantize_config_states_the_grouping_that_was_used():
    params = rtn_quantize(torch.randn(8, 32), RTNConfig(bits=4, group_size=16))
    dynamic = gptq_quantize_config(params, act_order=False, sequential=True, damp=0.01, static_groups=False)
    assert dynamic["static_groups"] is False and dynamic["desc_act"] is False
    ordered = gptq_quantize_config(params, act_order=True, sequential=True, damp=0.01, static_groups=False)
    assert ordered["static_groups"] is True and ordered["desc_act"] is True  # act-order forces static groups
