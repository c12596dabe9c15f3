"""Exporters by name: the registry, choose_format's rules, plan checks before calibration, every built-in
format saved and reloaded (pruned and quantized ones included), and a third-party exporter with its own
load() that compress.load uses."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import compress.exporters.base as xbase
from compress import arch
from compress.errors import CompressError
from compress.exporters import Exporter, choose_format, exporter_names, get_exporter
from compress.models import load_model
from compress.plugin import build_method
from tests.helpers import isolate_registry, make_tiny_llama
from tests.helpers.models import logits, uneven_tiny

GPTQ = {"bits": 4, "group_size": 32}


def rtn(model, bits=4, group_size=32, sym=True):
    """Quantize every decoder projection by round-to-nearest, as the rtn method does (no walk needed)."""
    from compress.methods.quantize.config import RTNConfig
    from compress.methods.quantize.grid import rtn_quantize
    from compress.methods.quantize.rtn import set_quantized

    config = RTNConfig(bits=bits, group_size=group_size, sym=sym)
    for layer in arch.decoder_layers(model):
        for name in arch.PROJECTIONS:
            module = arch.projection(layer, name)
            set_quantized(module, rtn_quantize(module.weight.detach().float(), config))
    return model


def test_builtin_exporters_and_unknown_name():
    assert {"safetensors", "compressed-tensors", "gptq", "peft"} <= set(exporter_names())
    assert get_exporter("gptq").kind == "quantized" and get_exporter("peft").kind == "adapter"
    with pytest.raises(CompressError, match=r"unknown export format 'onnx' \(available: auto, compressed-tensors, "
                                            r"gptq, hybrid, peft, safetensors"):
        get_exporter("onnx")
    with pytest.raises(CompressError, match="unknown export format 'onnx'"):
        choose_format("onnx", make_tiny_llama(), [])


@pytest.mark.parametrize("requested, methods, expected", [
    ("auto", [], "safetensors"),
    (None, [("slimgpt", {"ratio": 0.2})], "safetensors"),
    ("auto", [("slimgpt", {"ratio": 0.2}), ("gptq", GPTQ)], "compressed-tensors"),
    ("gptq", [("rtn", GPTQ)], "gptq"),
    ("compressed-tensors", [("gptq", GPTQ)], "compressed-tensors"),
    ("auto", [("lora", {"r": 4})], "peft"),
    ("safetensors", [], "safetensors"),
])
def test_choose_format_rules(requested, methods, expected):
    built = [build_method(name, options) for name, options in methods]
    assert choose_format(requested, make_tiny_llama(), built) == expected


@pytest.mark.parametrize("requested, methods, message", [
    ("gptq", [("slimgpt", {"ratio": 0.2})], r"'gptq' writes quantized weights, but the stages leave float weights; "
                                            r"use format safetensors \(or auto\)"),
    ("compressed-tensors", [], r"writes quantized weights, but the model holds float weights"),
    ("safetensors", [("gptq", GPTQ)], r"'safetensors' writes float weights, but method gptq produces quantized "
                                      r"weights; use format compressed-tensors or gptq"),
    ("safetensors", [("bone", {"r": 4})], r"method bone produces a peft adapter; use format peft"),
])
def test_choose_format_refuses_a_format_that_cannot_hold_the_result(requested, methods, message):
    built = [build_method(name, options) for name, options in methods]
    with pytest.raises(CompressError, match=message):
        choose_format(requested, make_tiny_llama(), built)


def test_choose_format_reads_a_quantized_model():
    model = rtn(make_tiny_llama())
    assert choose_format("auto", model, []) == "compressed-tensors"
    assert choose_format("gptq", model, []) == "gptq"
    with pytest.raises(CompressError, match="the model holds quantized weights; use format compressed-tensors or gptq"):
        choose_format("safetensors", model, [])


def test_a_method_naming_an_unregistered_exporter():
    method = build_method("rtn", GPTQ)
    method.output_format = "nowhere"
    with pytest.raises(CompressError, match="method rtn needs export format 'nowhere', which is not registered"):
        choose_format("auto", make_tiny_llama(), [method])


def test_quantized_plan_checks_before_calibration():
    ct, gptq = get_exporter("compressed-tensors"), get_exporter("gptq")
    model = make_tiny_llama()  # hidden 64, FFN 96
    with pytest.raises(CompressError, match=r"--group-size 64 does not divide the input width 96 of "
                                            r"model.layers.0.mlp.down_proj"):
        ct.check_plan(model, [build_method("rtn", {"bits": 4, "group_size": 64})])
    # a pruning stage first may still change FFN widths: only the hidden-size sides are checked now
    ct.check_plan(model, [build_method("slimgpt", {"ratio": 0.2}), build_method("rtn", {"bits": 4, "group_size": 64})])
    with pytest.raises(CompressError, match="one quantization grid"):
        ct.check_plan(model, [build_method("rtn", {"bits": 4, "group_size": 32}), build_method("gptq", {"bits": 8})])
    odd = make_tiny_llama(hidden_size=40, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64)
    with pytest.raises(CompressError, match="--format gptq packs 3-bit codes into 32-bit words"):
        gptq.check_plan(odd, [build_method("gptq", {"bits": 3, "group_size": -1})])
    ct.check_plan(odd, [build_method("gptq", {"bits": 3, "group_size": -1})])  # compressed-tensors holds it
    with pytest.raises(CompressError, match="export format 'gptq' has no option 'desc'"):
        gptq.check_plan(model, [], {"desc": True})


def test_safetensors_round_trip_and_record(tmp_path, tiny_model_folder):
    loaded = load_model(tiny_model_folder)
    out = get_exporter("safetensors").save(loaded.model, loaded.tokenizer, tmp_path / "out",
                                           {"command": "test", "metrics": {"x": 1}}, source=tiny_model_folder)
    assert {"config.json", "model.safetensors", "compress.json", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    record = json.loads((out / "compress.json").read_text())
    assert record["format"] == "safetensors" and record["command"] == "test" and "versions" in record
    again = load_model(out)
    assert again.tokenizer is not None
    for name, tensor in loaded.model.state_dict().items():
        assert torch.equal(again.model.state_dict()[name], tensor), name
    with pytest.raises(CompressError, match="already exists; pass --force"):
        get_exporter("safetensors").save(loaded.model, None, out, {})
    with pytest.raises(CompressError, match="overwrite or sit inside the input"):
        get_exporter("safetensors").save(loaded.model, None, tiny_model_folder, {}, source=tiny_model_folder,
                                         force=True)


def test_safetensors_refuses_a_quantized_model(tmp_path):
    with pytest.raises(CompressError, match="'safetensors' writes float weights, and the model does not hold them; "
                                            "use format compressed-tensors or gptq"):
        get_exporter("safetensors").save(rtn(make_tiny_llama()), None, tmp_path / "out", {})
    with pytest.raises(CompressError, match="'gptq' writes quantized weights, and the model does not hold them"):
        get_exporter("gptq").save(make_tiny_llama(), None, tmp_path / "out", {})
    assert not list(tmp_path.iterdir())  # nothing written


@pytest.mark.parametrize("sym", [True, False])
def test_compressed_tensors_of_a_pruned_dropped_model_reloads(tmp_path, sym):
    model = uneven_tiny()
    arch.drop_layers(model, [3])
    rtn(model, sym=sym)
    expected = logits(model)
    out = get_exporter("compressed-tensors").save(model, None, tmp_path / "ct", {"test": True})
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and config["layer_intermediate_size"] == [96, 64, 96]
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    assert (out / "modeling_compress_llama.py").is_file()
    assert model.config.model_type == "llama"  # swapped back after the save
    reloaded = load_model(out, tokenizer=False).model
    assert arch.layout(reloaded).layers == arch.layout(model).layers
    assert (logits(reloaded) - expected).abs().max().item() <= 1e-4


def test_gptq_options_come_from_the_stages_and_codes_unpack(tmp_path):
    from compress.methods.quantize.export import quantized_linears
    from compress.methods.quantize.pack import unpack_int32

    model = rtn(uneven_tiny(layers=2), sym=False)
    exporter = get_exporter("gptq")
    options = exporter.options([build_method("gptq", {**GPTQ, "act_order": True, "damp": 0.05})])
    assert options == {"act_order": True, "sequential": True, "damp": 0.05, "static_groups": True}
    out = exporter.save(model, None, tmp_path / "g", {"test": True}, options=options)
    qconfig = json.loads((out / "quantize_config.json").read_text())
    assert (qconfig["desc_act"], qconfig["damp_percent"], qconfig["bits"]) == (True, 0.05, 4)
    assert json.loads((out / "config.json").read_text())["layer_num_attention_heads"] == [4, 2]
    tensors = load_file(str(out / "model.safetensors"))
    name = "model.layers.1.self_attn.o_proj"
    module, params = quantized_linears(model)[name]
    codes = unpack_int32(tensors[f"{name}.qweight"], 4, module.in_features, dim=0)  # (in, out)
    assert torch.equal(codes.t(), params.codes.long())
    # without options: read back from the record's stages, as `compress run` writes them
    record = {"stages": [{"method": "gptq", "config": {"act_order": False, "sequential": False}}]}
    out = exporter.save(model, None, tmp_path / "g2", record)
    qconfig = json.loads((out / "quantize_config.json").read_text())
    assert (qconfig["desc_act"], qconfig["true_sequential"]) == (False, False)
    assert json.loads((out / "compress.json").read_text())["format"] == "gptq"


def test_peft_adapter_and_merged_weights_reload(tmp_path):
    from transformers import AutoModelForCausalLM

    from compress.methods.bone.adapter import attach_adapter

    base_folder = tmp_path / "base"
    make_tiny_llama().save_pretrained(base_folder)
    peft_model = attach_adapter(load_model(base_folder).model, "lora", 4, seed=0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)  # a trained adapter: it changes the model
    expected = logits(peft_model)
    exporter = get_exporter("peft")
    assert choose_format("auto", peft_model, []) == "peft"
    out = exporter.save(peft_model, None, tmp_path / "adapter", {"command": "adapt"}, source=base_folder)
    assert (out / "adapter_config.json").is_file() and not (out / "config.json").exists()
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(base_folder)
    assert json.loads((out / "compress.json").read_text())["format"] == "peft"
    reloaded = load_model(out).model  # the base through the package, then the adapter
    assert type(reloaded).__name__.startswith("Peft")
    assert (logits(reloaded) - expected).abs().max().item() <= 1e-5
    merged = exporter.save(peft_model, None, tmp_path / "merged", {}, source=base_folder, options={"merge": True})
    assert (merged / "adapter" / "adapter_config.json").is_file()
    stock = AutoModelForCausalLM.from_pretrained(str(merged)).eval()
    assert (logits(stock) - expected).abs().max().item() <= 1e-4
    assert (logits(load_model(merged).model) - expected).abs().max().item() <= 1e-4


class _Toy(torch.nn.Module):
    """A module class transformers knows nothing about."""

    def __init__(self, n: int):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.zeros(n))

    def forward(self, x):
        return x * self.scale


class _ToyExporter(Exporter):
    name = "test-toy"
    kind = "toy"
    auto_priority = 5

    def holds(self, model):
        return isinstance(model, _Toy)

    def write(self, model, tokenizer, folder, options, record):
        save_file({"scale": model.scale.detach().contiguous()}, str(folder / "toy.safetensors"))

    def load(self, folder, dtype, device):
        scale = load_file(str(folder / "toy.safetensors"))["scale"]
        model = _Toy(scale.numel())
        model.scale.data.copy_(scale)
        return model.to(dtype)


class _EntryPoint:
    def __init__(self, name, obj):
        self.name, self.obj = name, obj

    def load(self):
        if isinstance(self.obj, Exception):
            raise self.obj
        return self.obj


@pytest.fixture
def with_toy(monkeypatch):
    isolate_registry(monkeypatch, xbase, [_EntryPoint("broken", ImportError("missing dependency")),
                                          _EntryPoint("test-toy", _ToyExporter)])


def test_third_party_exporter_saves_and_reloads_its_own_module(tmp_path, with_toy):
    import compress

    assert "test-toy" in exporter_names() and "broken" not in exporter_names()
    toy = _Toy(5)
    toy.scale.data.copy_(torch.arange(5.0))
    assert choose_format("auto", toy, []) == "test-toy"
    with pytest.raises(CompressError, match="'safetensors' writes float weights, but the model holds toy"):
        choose_format("safetensors", toy, [])
    out = get_exporter("test-toy").save(toy, None, tmp_path / "toy", {"command": "test"})
    assert not (out / "config.json").exists()  # only its own load() can read it
    loaded = compress.load(out)
    assert isinstance(loaded.model, _Toy) and torch.equal(loaded.model.scale, toy.scale)
    assert not loaded.model.training


def test_a_folder_whose_format_is_not_registered_loads_as_before(tmp_path):
    model = make_tiny_llama()
    model.save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "compress.json").write_text(json.dumps({"format": "someone-elses"}))
    reloaded = load_model(tmp_path / "m").model
    assert torch.equal(logits(reloaded), logits(model))
