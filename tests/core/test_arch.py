"""The layout map: names and roles, widths of pruned/uneven models, depth pruning with a working KV
cache, the configs that describe them, and (slow) smollm2-135m with two layers dropped reloading."""

from __future__ import annotations

import json

import pytest
import torch

from compress import arch
from compress.errors import CompressError
from compress.methods.slimgpt.shrink import shrink_attention, shrink_mlp
from tests.helpers import make_tiny_llama
from tests.helpers.models import IDS, logits, uneven_tiny

def greedy_without_cache(model, ids, steps):
    # generate without a cache stops where the cached one does (an EOS token)
    return model.generate(ids, max_new_tokens=steps, do_sample=False, use_cache=False)


def test_names_roles_and_points():
    assert arch.PROJECTIONS == ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    assert arch.SHORT_NAMES[0] == "q_proj" and arch.SHORT_NAMES[-1] == "down_proj"
    assert [arch.point(n) for n in arch.PROJECTIONS] == [0, 0, 0, 1, 2, 2, 3]
    assert arch.role(arch.O) == "attn_out" and arch.role(arch.GATE) == "mlp_in" and arch.role("lm_head") is None
    assert arch.module_name(3, arch.DOWN) == "model.layers.3.mlp.down_proj"
    assert arch.layer_index("model.layers.12.self_attn.q_proj") == 12 and arch.layer_index("lm_head") is None
    assert arch.kv_groups(6, 2) == [[0, 1, 2], [3, 4, 5]]
    assert arch.head_channels([1], 4).tolist() == [4, 5, 6, 7]
    with pytest.raises(CompressError, match="cannot share"):
        arch.kv_groups(5, 2)


def test_layout_of_a_pruned_uneven_model():
    model = uneven_tiny()
    lay = arch.layout(model)
    assert (lay.hidden, lay.head_dim, lay.depth, lay.parent_depth) == (64, 16, 4, 4)
    assert lay.layers[0] == arch.LayerWidths(4, 2, 96) and lay.layers[1] == arch.LayerWidths(2, 2, 64)
    assert lay.layers[1].groups == 1 and not lay.uniform and lay.kept_layers == [0, 1, 2, 3] and lay.dropped == []
    projections = sum(arch.projection(layer, n).weight.numel()
                      for layer in model.model.layers for n in arch.PROJECTIONS)
    assert lay.parameters() == projections
    assert arch.layer_widths(model.model.layers[1], 16) == (2, 2, 64)  # unpacks like the old tuple


def test_not_llama_like_models_are_named():
    from transformers import GPT2Config, GPT2LMHeadModel

    from compress.models import check_llama_like, decoder_layers  # the old names still work

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32))
    with pytest.raises(CompressError, match="not LLaMA-like"):
        check_llama_like(model)
    with pytest.raises(CompressError, match="no decoder layers"):
        decoder_layers(model)
    with pytest.raises(CompressError, match="no decoder layers"):
        arch.layout(model)
    assert arch.width_config(model) == (model.config, {})


def test_drop_layers_keeps_the_remaining_computation_and_the_kv_cache():
    from transformers import LlamaForCausalLM

    model = make_tiny_llama(num_hidden_layers=4)
    state = model.state_dict()
    lay = arch.drop_layers(model, [1])
    assert lay.kept_layers == [0, 2, 3] and lay.dropped == [1] and lay.parent_depth == 4
    assert model.config.num_hidden_layers == 3 and model.config.layer_parent_index == [0, 2, 3]
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1, 2]
    # the same computation as a 3-layer Llama built with the kept layers' weights
    reference = make_tiny_llama(num_hidden_layers=3)
    old = {0: 0, 1: 2, 2: 3}
    remapped = {}
    for key in reference.state_dict():
        if key.startswith("model.layers."):
            i = int(key.split(".")[2])
            remapped[key] = state[key.replace(f"model.layers.{i}.", f"model.layers.{old[i]}.", 1)]
        else:
            remapped[key] = state[key]
    reference.load_state_dict(remapped)
    assert isinstance(reference, LlamaForCausalLM)
    assert torch.equal(logits(model), logits(reference))
    prompt = IDS[:1, :5]
    cached = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True)
    assert torch.equal(cached, greedy_without_cache(model, prompt, 6))
    # dropping again composes: positions are the present ones, provenance the parent's
    lay = arch.drop_layers(model, [0])
    assert lay.kept_layers == [2, 3] and lay.dropped == [0, 1] and model.config.parent_num_hidden_layers == 4


def test_drop_layers_refuses_bad_indices():
    model = make_tiny_llama()
    with pytest.raises(CompressError, match="cannot drop layer 3: the model has layers 0..2"):
        arch.drop_layers(model, [3])
    with pytest.raises(CompressError, match="would leave no decoder layer"):
        arch.drop_layers(model, [0, 1, 2])
    assert len(model.model.layers) == 3 and model.config.num_hidden_layers == 3


def test_width_config_plain_uniform_and_per_layer():
    from transformers import LlamaConfig

    model = make_tiny_llama()
    assert arch.width_config(model) == (model.config, {})  # untouched: its own config
    arch.drop_layers(model, [1])
    config, extra = arch.width_config(model)  # depth only: still the model's own Llama config
    assert type(config) is LlamaConfig and config.num_hidden_layers == 2 and config.layer_parent_index == [0, 2]
    assert extra == {}

    model = uneven_tiny()
    arch.drop_layers(model, [3])
    config, extra = arch.width_config(model)
    assert config.model_type == "compress_llama" and list(extra) == ["modeling_compress_llama.py"]
    assert config.layer_num_attention_heads == [4, 2, 4] and config.layer_intermediate_size == [96, 64, 96]
    assert config.layer_parent_index == [0, 1, 2] and config.parent_num_hidden_layers == 4
    assert model.config.model_type == "llama"  # the model's own config is not changed


def test_pruned_then_dropped_uniform_is_a_plain_llama(tmp_path):
    from transformers import LlamaForCausalLM

    from compress.exporters import get_exporter

    model = make_tiny_llama(num_hidden_layers=4)
    for layer in model.model.layers:  # every layer loses the same head per KV group and 32 channels
        shrink_attention(layer.self_attn, layer.self_attn.o_proj.weight.detach(), [0, 2], [0, 1], 16)
        shrink_mlp(layer.mlp, layer.mlp.down_proj.weight.detach(), list(range(64)))
    arch.drop_layers(model, [0])
    expected = logits(model)
    out = get_exporter("safetensors").save(model, None, tmp_path / "out", {"test": True})
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and "auto_map" not in config and config["num_hidden_layers"] == 3
    assert config["layer_parent_index"] == [1, 2, 3] and config["num_attention_heads"] == 2
    reloaded = LlamaForCausalLM.from_pretrained(str(out)).eval()
    assert (logits(reloaded) - expected).abs().max().item() <= 1e-5
    assert arch.layout(reloaded).kept_layers == [1, 2, 3]


def test_compress_llama_config_checks_the_parent_index():
    from compress.modeling_pruned import CompressLlamaConfig

    values = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2, head_dim=16)
    CompressLlamaConfig(**values, layer_parent_index=[0, 3], parent_num_hidden_layers=4)
    with pytest.raises(Exception, match="layer_parent_index"):
        CompressLlamaConfig(**values, layer_parent_index=[3, 1], parent_num_hidden_layers=4)
    with pytest.raises(Exception, match="layer_parent_index has 3 entries"):
        CompressLlamaConfig(**values, layer_parent_index=[0, 1, 2])


def test_uneven_dropped_model_reloads_through_the_package_and_remote_code(tmp_path):
    from transformers import AutoModelForCausalLM

    from compress.exporters import get_exporter
    from compress.models import load_model

    model = uneven_tiny()
    arch.drop_layers(model, [2])
    expected = logits(model)
    generated = model.generate(IDS[:1, :5], max_new_tokens=5, do_sample=False, use_cache=True)
    out = get_exporter("safetensors").save(model, None, tmp_path / "out", {"test": True})
    for reloaded in (load_model(out, tokenizer=False).model,
                     AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True).eval()):
        assert (logits(reloaded) - expected).abs().max().item() <= 1e-5
        assert arch.layout(reloaded).kept_layers == [0, 1, 3]
        assert torch.equal(reloaded.generate(IDS[:1, :5], max_new_tokens=5, do_sample=False, use_cache=True),
                           generated)


@pytest.mark.slow
def test_smollm2_with_two_layers_dropped_reloads_both_ways(smollm2_folder, tmp_path):
    import compress
    from transformers import AutoModelForCausalLM

    from compress.exporters import get_exporter

    model = compress.load(smollm2_folder).model  # a fresh copy: the session fixture stays intact
    arch.drop_layers(model, [10, 20])
    lay = arch.layout(model)
    assert lay.depth == 28 and lay.dropped == [10, 20] and lay.parent_depth == 30
    ids = torch.randint(0, 49152, (1, 24), generator=torch.Generator().manual_seed(0))
    expected = logits(model, ids)
    out = get_exporter("safetensors").save(model, None, tmp_path / "smol-28", {"test": True})
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 28
    assert config["layer_parent_index"] == [i for i in range(30) if i not in (10, 20)]
    prompt = ids[:, :8]
    for reloaded in (compress.load(out).model,
                     AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True, dtype=torch.float32)):
        reloaded.eval()
        assert (logits(reloaded, ids) - expected).abs().max().item() <= 1e-4
        cached = reloaded.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=True)
        assert torch.equal(cached, greedy_without_cache(reloaded, prompt, 8))
