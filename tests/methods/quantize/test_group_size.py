"""The automatic group size: defaults that work on the default model (576 is not a multiple of 128)."""

from __future__ import annotations

import json

import pytest

from compress.methods.quantize.config import RTNConfig
from compress.methods.quantize.targets import resolve_group_size
from tests.helpers import make_tiny_llama, run_cli


@pytest.mark.parametrize("hidden, ffn, heads, kv, expected", [
    (576, 1536, 9, 3, 64),     # smollm2-135m's widths: 128 does not divide 576
    (4096, 14336, 32, 8, 128),  # Llama-3-8B's
    (64, 96, 4, 2, 32),         # 64 does not divide 96
    (40, 60, 4, 2, -1),         # none of 128/64/32 divides 40: one group per output channel
])
def test_auto_group_size_is_the_largest_that_divides_every_width(hidden, ffn, heads, kv, expected):
    model = make_tiny_llama(hidden_size=hidden, intermediate_size=ffn, num_attention_heads=heads,
                            num_key_value_heads=kv, num_hidden_layers=1)
    config = RTNConfig()
    note = resolve_group_size(model, config)
    assert config.group_size == expected and note.startswith(f"{expected} (auto")
    given = RTNConfig(group_size=16)
    assert resolve_group_size(model, given) is None and given.group_size == 16  # a given size is kept


def test_quantize_without_group_size_works_and_says_which(tiny_model_folder, tmp_path):
    out = tmp_path / "q"
    result = run_cli("quantize", tiny_model_folder, "--method", "rtn", "--out", out)
    assert result.exit_code == 0, result.output
    assert "group size" in result.stdout and "-1 (auto: 128, 64, 32 do not divide" in result.stdout
    assert json.loads((out / "compress.json").read_text())["config"]["group_size"] == -1
