"""`compress transfer`: the transfer, extract/apply, and one clear error line (exit 2) per bad input."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from click.testing import CliRunner

from compress.cli import main
from tests.helpers import make_tiny_llama
from tests.helpers.transfer import add_vocab_rows, drop_tensor, save, three_versions, weights


def run_cli(*args):
    return CliRunner().invoke(main, ["--quiet", *map(str, args)])


def assert_one_line_error(result, match):
    assert result.exit_code == 2, (result.output, result.exception)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert match in lines[0], lines[0]
    assert "Traceback" not in result.output


def assert_nothing_written(tmp_path, out):
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(f".{out.name}")]  # no temporary folder left


def folder_digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture
def versions(tmp_path):
    return three_versions(tmp_path)


def test_transfer_command_writes_the_finetuned_model_and_prints_the_report(tmp_path, versions):
    base, ft, _ = versions
    result = run_cli("transfer", "--source-base", base, "--source-ft", ft, "--target-base", base,
                     "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert "compatibility report" in result.stdout and "delta_rel" in result.stdout
    out, expected = weights(tmp_path / "out"), weights(ft)
    assert all(torch.equal(out[n], expected[n]) for n in expected)


def test_report_only_writes_nothing(tmp_path, versions):
    base, ft, target = versions
    result = run_cli("transfer", "--source-base", base, "--source-ft", ft, "--target-base", target, "--report-only")
    assert result.exit_code == 0, result.output
    assert "(median)" in result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "ft", "target"]


def test_extract_and_apply_commands(tmp_path, versions):
    base, ft, target = versions
    result = run_cli("transfer", "extract", "--source-base", base, "--source-ft", ft, "--out", tmp_path / "diff",
                     "--rank", 64)
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "diff" / "diff.json").read_text())["rank"] == 64
    result = run_cli("transfer", "apply", "--diff", tmp_path / "diff", "--target-base", base,
                     "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    out, expected = weights(tmp_path / "out"), weights(ft)
    # float32 factors of a full-rank SVD: Δ comes back to float32 rounding (values ~0.02, ulp ~2e-9).
    assert max(float((out[n] - expected[n]).abs().max()) for n in expected) < 1e-6


def test_architectures_that_differ(tmp_path, versions):
    base, ft, _ = versions
    other = save(make_tiny_llama(hidden_size=32, intermediate_size=48), tmp_path / "other")
    result = run_cli("transfer", "--source-base", base, "--source-ft", ft, "--target-base", other,
                     "--out", tmp_path / "out")
    assert_one_line_error(result, "architectures differ: hidden_size is 64 in the source base but 32 in the target base")
    assert_nothing_written(tmp_path, tmp_path / "out")


def test_a_missing_tensor(tmp_path, versions):
    base, ft, target = versions
    drop_tensor(ft, "model.layers.1.mlp.up_proj.weight")
    result = run_cli("transfer", "--source-base", base, "--source-ft", ft, "--target-base", target,
                     "--out", tmp_path / "out")
    assert_one_line_error(result, "missing tensor model.layers.1.mlp.up_proj.weight in the source fine-tuned model")
    assert_nothing_written(tmp_path, tmp_path / "out")


def test_a_missing_tensor_can_be_excluded(tmp_path, versions):
    base, ft, target = versions
    drop_tensor(ft, "model.layers.1.mlp.up_proj.weight")
    result = run_cli("transfer", "--source-base", base, "--source-ft", ft, "--target-base", target,
                     "--out", tmp_path / "out", "--exclude", r"layers\.1\.mlp\.up_proj")
    assert result.exit_code == 0, result.output
    name = "model.layers.1.mlp.up_proj.weight"
    assert torch.equal(weights(tmp_path / "out")[name], weights(target)[name])


@pytest.mark.parametrize("which", ["source-base", "source-ft", "target-base"])
def test_an_output_path_equal_to_an_input(tmp_path, versions, which):
    base, ft, target = versions
    folder = {"source-base": base, "source-ft": ft, "target-base": target}[which]
    before = folder_digest(folder)
    result = run_cli("transfer", "--source-base", base, "--source-ft", ft, "--target-base", target,
                     "--out", folder, "--force")
    assert_one_line_error(result, f"is the {which.replace('-', ' ').replace('ft', 'fine-tuned model')}")
    assert folder_digest(folder) == before


def test_a_vocabulary_mismatch_under_vocab_error(tmp_path, versions):
    base, ft, target = versions
    add_vocab_rows(ft, 3)
    result = run_cli("transfer", "--source-base", base, "--source-ft", ft, "--target-base", target,
                     "--out", tmp_path / "out", "--vocab", "error")
    assert_one_line_error(result, "vocabulary mismatch in ")
    assert "131 in the source fine-tuned model" in result.stderr
    assert_nothing_written(tmp_path, tmp_path / "out")


def test_a_shape_mismatch_outside_the_vocabulary(tmp_path, versions):
    base, ft, target = versions
    from safetensors.torch import load_file, save_file

    tensors = load_file(target / "model.safetensors")
    tensors["model.norm.weight"] = torch.ones(65)
    save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
    result = run_cli("transfer", "--source-base", base, "--source-ft", ft, "--target-base", target,
                     "--out", tmp_path / "out")
    assert_one_line_error(result, "shape mismatch in model.norm.weight")
    assert_nothing_written(tmp_path, tmp_path / "out")


def test_a_bad_regular_expression(tmp_path, versions):
    base, ft, target = versions
    result = run_cli("transfer", "--source-base", base, "--source-ft", ft, "--target-base", target,
                     "--out", tmp_path / "out", "--include", "mlp(")
    assert_one_line_error(result, "--include: invalid regular expression")


def test_missing_options_and_a_bad_rank(tmp_path, versions):
    base, ft, target = versions
    assert_one_line_error(run_cli("transfer", "--source-base", base), "needs --source-ft, --target-base, --out")
    result = run_cli("transfer", "--source-base", base, "--source-ft", ft, "--target-base", target,
                     "--out", tmp_path / "out", "--rank", 0)
    assert_one_line_error(result, "--rank must be a positive integer")


def test_apply_of_a_folder_that_is_not_an_artifact(tmp_path, versions):
    base, _, target = versions
    result = run_cli("transfer", "apply", "--diff", base, "--target-base", target, "--out", tmp_path / "out")
    assert_one_line_error(result, "is not a diff artifact")
    assert_nothing_written(tmp_path, tmp_path / "out")


@pytest.mark.slow
def test_the_alias_resolves_and_a_zero_diff_is_reported():
    result = run_cli("transfer", "--source-base", "smollm2-135m", "--source-ft", "smollm2-135m",
                     "--target-base", "smollm2-135m", "--report-only", "--include", r"layers\.0\.")
    assert result.exit_code == 0, result.output
    assert "(9 tensors;" in result.stdout  # layer 0: 7 matrices and 2 norms
    assert "warning: the fine-tuned model equals the source base: the diff is zero" in result.stderr
