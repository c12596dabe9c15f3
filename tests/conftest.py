"""Shared fixtures: tiny random Llama models (fast, exact) and the real smollm2-135m (slow)."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import make_tiny_llama


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


@pytest.fixture
def one_thread():
    """Tiny models on a shared CPU run ~10x faster on one thread than fighting for two."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
