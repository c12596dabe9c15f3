"""Shared fixtures: tiny random Llama models (fast, exact) and the real smollm2-135m (slow)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("COMPRESS_PROGRESS", "0")
REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
WIKI_TEST = SHARED_DATA / "wikitext-2-raw" / "wiki.test.raw"
WIKI_TRAIN = SHARED_DATA / "wikitext-2-raw" / "wiki.train.first1MB-noblank.txt"


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    values = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  tie_word_embeddings=False)
    values.update(overrides)
    return LlamaConfig(**values)


def make_tiny_llama(seed: int = 0, **overrides):
    """A tiny random Llama with grouped-query attention (4 query heads, 2 KV heads), float32, eval mode."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(**overrides)).eval()
    return model


@pytest.fixture
def tiny_llama():
    return make_tiny_llama()


@pytest.fixture
def tiny_tokens():
    return torch.randint(0, 128, (6, 24), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="session")
def smollm2_folder():
    from compress.models import resolve_model_path

    return resolve_model_path("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2(smollm2_folder):
    from compress.models import load_model

    return load_model(smollm2_folder)


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_folder))


@pytest.fixture
def tiny_model_folder(tmp_path, smollm2_tokenizer):
    """A saved tiny random Llama with the smollm2 tokenizer (so text data works), vocab 49152."""
    model = make_tiny_llama(vocab_size=49152, hidden_size=32, intermediate_size=48, num_hidden_layers=2)
    folder = tmp_path / "tiny"
    model.save_pretrained(folder)
    smollm2_tokenizer.save_pretrained(folder)
    return folder
