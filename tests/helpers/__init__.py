"""Shared test helpers (not fixtures): repository paths, tiny random Llama models, the CLI runner.

Test modules import from here (or from the other modules of this package), never from each other.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from click.testing import CliRunner

os.environ.setdefault("COMPRESS_PROGRESS", "0")
REPO = Path(__file__).resolve().parents[2]
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


def run_cli(*args):
    result = CliRunner().invoke(_main(), ["--quiet", *map(str, args)])
    return result


def assert_one_line_error(result, match):
    assert result.exit_code == 2, (result.output, result.exception)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert match in lines[0]
    assert "Traceback" not in result.output


def _main():
    from compress.cli import main

    return main


def isolate_registry(monkeypatch, module, entries) -> None:
    """Give ``module`` (compress.plugin or compress.exporters.base) a copy of its registry that loads,
    from its entry-point group, only ``entries`` (objects with ``name`` and ``load()``)."""
    monkeypatch.setattr(module, "_REGISTRY", dict(module._REGISTRY))
    monkeypatch.setattr(module, "_loaded", False)

    def entry_points(group):
        assert group == module.ENTRY_POINT_GROUP
        return list(entries)

    monkeypatch.setattr(module, "entry_points", entry_points)
