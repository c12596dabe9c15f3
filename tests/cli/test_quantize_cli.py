"""``compress quantize``: a working run, and one clear error line (exit 2, nothing written) per bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from compress.cli import main
from compress.plugin import get_method, make_config

REPO = Path(__file__).resolve().parents[2]


def run(*args):
    return CliRunner().invoke(main, ["--quiet", "quantize", *map(str, args)])


def assert_clean_error(result, out: Path, words: str):
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], result.output
    assert not out.exists()
    assert not any(p.name.startswith(f".{out.name}.tmp") for p in out.parent.iterdir())


def test_gptq_cli_writes_gptq_layout_and_table(tiny_model_folder, tmp_path):
    out = tmp_path / "q"
    result = run(tiny_model_folder, "--method", "gptq", "--bits", "4", "--group-size", "16", "--act-order",
                 "--format", "gptq", "--data", "wikitext2", "--samples", "2", "--seqlen", "16", "--out", out)
    assert result.exit_code == 0, result.output
    assert "mean output_err" in result.output and "size on disk after (MB)" in result.output
    record = json.loads((out / "compress.json").read_text())
    assert len(record["layers"]) == 2 and record["config"]["act_order"] is True
    assert json.loads((out / "quantize_config.json").read_text())["bits"] == 4


def test_bits_outside_supported_set(tiny_model_folder, tmp_path):
    assert_clean_error(run(tiny_model_folder, "--method", "rtn", "--bits", "5", "--out", tmp_path / "o"),
                       tmp_path / "o", "'bits' must be one of 2, 3, 4, 8")


def test_group_size_not_dividing_input_width(tiny_model_folder, tmp_path):
    # the tiny model's widths are 32 and 48: 24 divides 48 but not 32
    assert_clean_error(run(tiny_model_folder, "--method", "rtn", "--group-size", "24", "--out", tmp_path / "o"),
                       tmp_path / "o", "does not divide the input width 32")


def test_ignore_pattern_matching_nothing(tiny_model_folder, tmp_path):
    assert_clean_error(run(tiny_model_folder, "--method", "rtn", "--group-size", "16", "--ignore", "lm_haed",
                           "--out", tmp_path / "o"), tmp_path / "o", "ignore pattern 'lm_haed' matches no Linear")


def test_already_quantized_checkpoint(tiny_model_folder, tmp_path):
    first = run(tiny_model_folder, "--method", "rtn", "--group-size", "16", "--out", tmp_path / "q")
    assert first.exit_code == 0, first.output
    before = sorted(p.name for p in (tmp_path / "q").iterdir())
    assert_clean_error(run(tmp_path / "q", "--method", "rtn", "--group-size", "16", "--out", tmp_path / "o"),
                       tmp_path / "o", "already quantized")
    assert sorted(p.name for p in (tmp_path / "q").iterdir()) == before  # input untouched


@pytest.mark.parametrize("recipe", sorted((REPO / "recipes").glob("*gptq*.yaml")), ids=lambda p: p.name)
def test_recipes_validate(recipe):
    data = yaml.safe_load(recipe.read_text())
    assert {"model", "data", "stages"} <= set(data)
    for stage in data["stages"]:
        cls = get_method(stage["method"])
        config = make_config(cls.Config, stage.get("options", {}), where=f"{recipe.name}: {stage['method']}")
        if stage["method"] in ("gptq", "rtn"):  # stacking recipes also hold a pruning stage
            assert config.bits == 4
