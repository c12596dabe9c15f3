"""The method registry (built-ins and the entry-point group), typed configs, and atomic saving."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch

import compress.plugin as base
from compress.errors import CompressError, ConfigError
from compress.export import RECORD_FILE, atomic_output, save_model
from compress.plugin import LayerMethod, build_method, config_field, make_config
from compress.models import load_model
from compress.walk import walk
from tests.helpers import isolate_registry, make_tiny_llama


@dataclass
class _ScaleConfig:
    factor: float = config_field(1.0, "multiply every o_proj weight by this")
    layers: list[int] = config_field([], "layers to touch (empty: all)")
    mode: str = config_field("mul", "mul or add")


class _ScalePlugin(LayerMethod):
    """A third-party method, as an installed package would ship it."""

    name = "test-scale"
    Config = _ScaleConfig

    def groups(self, layer, index):
        return [base.Group(["self_attn.o_proj"], stats="none")]

    def apply(self, ctx):
        if not self.config.layers or ctx.index in self.config.layers:
            ctx.layer.self_attn.o_proj.weight.data.mul_(self.config.factor)
        return {"scaled": ctx.index}


class _FakeEntryPoint:
    name = "test-scale"

    def load(self):
        return _ScalePlugin


class _BrokenEntryPoint:
    name = "broken"

    def load(self):
        raise ImportError("missing dependency of a broken plugin")


@pytest.fixture
def fresh_registry(monkeypatch):
    isolate_registry(monkeypatch, base, [_BrokenEntryPoint(), _FakeEntryPoint()])


def test_builtin_methods_are_registered():
    names = set(base.available_methods())
    assert {"gptq", "rtn", "slimgpt"} <= names


def test_entry_point_plugin_is_found_and_runs_in_the_walk(fresh_registry):
    methods = base.available_methods()
    assert "test-scale" in methods and "broken" not in methods
    model = make_tiny_llama()
    before = [layer.self_attn.o_proj.weight.clone() for layer in model.model.layers]
    method = build_method("test-scale", {"factor": 2, "layers": [1]})
    assert method.config.factor == 2.0 and isinstance(method.config.factor, float)
    result = walk(model, torch.randint(0, 128, (2, 8)), [method], device="cpu", batch_size=2)
    assert [r["test-scale"]["scaled"] for r in result.records] == [0, 1, 2]
    for i, layer in enumerate(model.model.layers):
        expected = before[i] * (2.0 if i == 1 else 1.0)
        assert torch.equal(layer.self_attn.o_proj.weight, expected)


def test_unknown_method_names_the_available_ones():
    with pytest.raises(ConfigError, match=r"unknown method 'nope' \(available: .*gptq"):
        build_method("nope")


@pytest.mark.parametrize("options, message", [
    ({"factr": 2}, r"unknown field 'factr'"),
    ({"factor": "two"}, r"field 'factor' must be a number, got 'two'"),
    ({"factor": True}, r"field 'factor' must be a number"),
    ({"layers": 3}, r"field 'layers' must be a list"),
    ({"layers": [1, "x"]}, r"field 'layers' must be an integer"),
    ({"mode": 5}, r"field 'mode' must be a string"),
])
def test_config_errors_name_the_field(options, message):
    with pytest.raises(ConfigError, match=message):
        make_config(_ScaleConfig, options, where="method test-scale")


def test_config_must_be_a_mapping():
    with pytest.raises(ConfigError, match="options must be a mapping"):
        make_config(_ScaleConfig, [1, 2])


def test_save_writes_weights_config_and_record_that_reload(tmp_path, tiny_model_folder):
    loaded = load_model(str(tiny_model_folder))
    out = save_model(loaded.model, loaded.tokenizer, tmp_path / "out", {"method": "none", "metrics": {"x": 1.5}},
                     source_path=tiny_model_folder)
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", RECORD_FILE, "tokenizer.json"} <= files
    record = json.loads((out / RECORD_FILE).read_text())
    assert record["method"] == "none" and record["metrics"] == {"x": 1.5}
    assert record["versions"]["torch"] == torch.__version__ and "transformers" in record["versions"]
    again = load_model(str(out)).model
    for (name, a), (_, b) in zip(loaded.model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_existing_output_needs_force_and_is_replaced_whole(tmp_path, tiny_model_folder):
    loaded = load_model(str(tiny_model_folder))
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("keep me unless --force")
    with pytest.raises(CompressError, match="already exists; pass --force"):
        save_model(loaded.model, loaded.tokenizer, out, {}, source_path=tiny_model_folder)
    assert (out / "old.txt").read_text() == "keep me unless --force"
    save_model(loaded.model, loaded.tokenizer, out, {}, source_path=tiny_model_folder, force=True)
    assert not (out / "old.txt").exists() and (out / RECORD_FILE).is_file()


@pytest.mark.parametrize("where", ["same", "inside"])
def test_output_never_over_the_input(tmp_path, tiny_model_folder, where):
    target = tiny_model_folder if where == "same" else tiny_model_folder / "sub"
    before = {p.name: p.read_bytes() for p in tiny_model_folder.iterdir()}
    loaded = load_model(str(tiny_model_folder))
    with pytest.raises(CompressError, match="overwrite or sit inside the input"):
        save_model(loaded.model, loaded.tokenizer, target, {}, source_path=tiny_model_folder, force=True)
    assert {p.name: p.read_bytes() for p in tiny_model_folder.iterdir()} == before


def test_failed_save_leaves_nothing_and_keeps_the_old_output(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_output(out, force=True) as tmp:
            (tmp / "half.bin").write_bytes(b"partial")
            raise RuntimeError("killed mid-save")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert [p.name for p in out.iterdir()] == ["old.txt"]
