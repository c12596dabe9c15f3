"""`compress compare`: one table over a quantized, a pruned and a stacked output, the plot, protocols
that differ flagged, --eval on one protocol, and one clear error line for bad input."""

from __future__ import annotations

import json
import math

import pytest
import yaml

from tests.helpers import assert_one_line_error, run_cli
from tests.helpers.adapt import save_tiny_model

EVAL = ["--eval", "--eval-seqlen", "64", "--eval-windows", "2"]


def _ok(result):
    assert result.exit_code == 0, (result.output, result.exception)
    return result


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    """A tiny random Llama (smollm2 tokenizer) and four outputs of it: RTN W4, SlimGPT 25 % with
    perplexity at 64 × 2, SlimGPT 25 % then GPTQ W4 in one walk with perplexity and fidelity at 64 × 2,
    and SlimGPT 25 % with perplexity at 32 × 3 (another protocol)."""
    root = tmp_path_factory.mktemp("compare")
    tiny = save_tiny_model(root / "tiny")
    calib = ["--data", "wikitext2", "--samples", "2", "--seqlen", "16"]
    _ok(run_cli("quantize", tiny, "--method", "rtn", "--group-size", "16", "--out", root / "quantized"))
    _ok(run_cli("prune", tiny, "--ratio", "0.25", *calib, *EVAL, "--out", root / "pruned"))
    _ok(run_cli("prune", tiny, "--ratio", "0.25", *calib, "--eval", "--eval-seqlen", "32", "--eval-windows", "3",
                "--out", root / "pruned-32"))
    recipe = {"model": str(tiny), "data": {"source": "wikitext2", "samples": 2, "seqlen": 16},
              "stages": [{"method": "slimgpt", "options": {"ratio": 0.25, "ffn_multiple": 16}},
                         {"method": "gptq", "options": {"bits": 4, "group_size": 16}}],
              "eval": {"perplexity": {"data": "wikitext2", "seqlen": 64, "windows": 2},
                       "fidelity": {"reference": str(tiny), "seqlen": 64, "windows": 2}}}
    (root / "stacked.yaml").write_text(yaml.safe_dump(recipe))
    _ok(run_cli("run", root / "stacked.yaml", "--out", root / "stacked"))
    return root


def record(folder):
    return json.loads((folder / "compress.json").read_text())


def safetensors_bytes(folder):
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def assert_png_has_content(path):
    from matplotlib.image import imread

    image = imread(path)[..., :3]  # (H, W, 3) in [0, 1]
    assert image.shape[0] > 200 and image.shape[1] > 300
    assert image.std() > 0.05 and (image.mean(-1) < 0.9).mean() > 0.01  # not blank: lines, points, text


def test_three_outputs_table_and_plot(outputs):
    folders = [outputs / "quantized", outputs / "pruned", outputs / "stacked"]
    plot = outputs / "compare.png"
    result = _ok(run_cli("compare", *folders, "--plot", plot))
    lines = result.stdout.splitlines()
    assert lines[0].split()[:5] == ["output", "method", "options", "parameters", "MB"]
    rows = {line.split()[0]: line for line in lines[2:5]}
    assert set(rows) == {"quantized", "pruned", "stacked"}
    assert "rtn" in rows["quantized"] and "bits=4 group_size=16" in rows["quantized"]
    assert "slimgpt+gptq" in rows["stacked"] and "ratio=0.25" in rows["stacked"]
    assert "!" not in result.stdout  # one perplexity protocol: nothing flagged
    assert "no perplexity recorded for quantized" in result.stderr
    assert_png_has_content(plot)

    data = json.loads(_ok(run_cli("compare", *folders, "--json")).stdout)
    by_name = {r["output"]: r for r in data["rows"]}
    for name in ("quantized", "pruned", "stacked"):
        folder = outputs / name
        assert by_name[name]["bytes_on_disk"] == safetensors_bytes(folder)  # read from the files, exact
        assert by_name[name]["parameters"] == record(folder)["parameters"]["after"]
    for name in ("pruned", "stacked"):  # the recorded value and its protocol, to the last digit
        recorded = record(outputs / name)["metrics"]["perplexity"][0]
        assert by_name[name]["perplexity"]["value"] == recorded["perplexity"]
        assert by_name[name]["perplexity"]["protocol"] == {"data": "wikitext2", "seqlen": 64, "windows": 2,
                                                           "stride": 64}
    fidelity = record(outputs / "stacked")["metrics"]["fidelity"]
    assert by_name["stacked"]["fidelity"]["kl_divergence"] == fidelity["kl_divergence"]
    assert by_name["pruned"]["parameters"] < by_name["quantized"]["parameters"]
    assert by_name["stacked"]["bytes_on_disk"] < by_name["pruned"]["bytes_on_disk"]


def test_outputs_with_different_perplexity_protocols_are_flagged(outputs):
    result = _ok(run_cli("compare", outputs / "pruned", outputs / "pruned-32", outputs / "stacked", "--json"))
    data = json.loads(result.stdout)
    flagged = {r["output"]: r["perplexity"]["flagged"] for r in data["rows"]}
    assert flagged == {"pruned": False, "pruned-32": True, "stacked": False}  # 64 × 2 is the majority's
    assert data["perplexity_protocol"] == {"data": "wikitext2", "seqlen": 64, "windows": 2, "stride": 64}
    assert any("perplexity protocols differ" in w and "pruned-32" in w for w in data["warnings"])

    table = _ok(run_cli("compare", outputs / "pruned", outputs / "pruned-32"))
    row = next(line for line in table.stdout.splitlines() if line.lstrip().startswith("pruned-32"))
    assert "! wikitext2 @32 x3" in row
    assert "perplexity protocols differ" in table.stderr and "--eval" in table.stderr


def test_eval_measures_every_output_on_one_protocol(outputs):
    folders = [outputs / "quantized", outputs / "pruned", outputs / "pruned-32", outputs / "stacked"]
    result = _ok(run_cli("compare", *folders, "--eval", "wikitext2", "--seqlen", "64", "--windows", "2",
                         "--reference", outputs / "tiny", "--json", "--device", "cpu"))
    data = json.loads(result.stdout)
    assert data["warnings"] == []
    protocols = {json.dumps(r["perplexity"]["protocol"], sort_keys=True) for r in data["rows"]}
    assert len(protocols) == 1 and not any(r["perplexity"]["flagged"] for r in data["rows"])
    by_name = {r["output"]: r for r in data["rows"]}
    # reloaded from disk and measured again: the number `prune --eval` recorded on the same protocol
    # from the in-memory model right after the walk
    recorded = record(outputs / "pruned")["metrics"]["perplexity"][0]["perplexity"]
    assert by_name["pruned"]["perplexity"]["value"] == pytest.approx(recorded, rel=1e-5)
    for row in data["rows"]:
        fid = row["fidelity"]
        assert fid["protocol"]["positions"] == 2 * 64  # every position of both windows
        assert 0.0 <= fid["kl_divergence"] < 0.05 and 0.5 < fid["top1_agreement"] <= 1.0
        assert math.isfinite(row["perplexity"]["value"])


def test_folder_without_record_is_one_error_line(outputs, tmp_path):
    plot = tmp_path / "p.png"
    assert_one_line_error(run_cli("compare", outputs / "pruned", outputs / "tiny", "--plot", plot),
                          "has no compress.json")
    assert not plot.exists()
    assert_one_line_error(run_cli("compare", tmp_path / "nowhere"), "output folder not found")


def test_bad_record_and_bad_options(outputs, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "compress.json").write_text("{not json")
    assert_one_line_error(run_cli("compare", broken), "compress.json is not valid JSON")
    assert_one_line_error(run_cli("compare", outputs / "pruned", "--seqlen", "64"), "give --eval too")
    assert_one_line_error(run_cli("compare", outputs / "pruned", "--reference", outputs / "tiny"),
                          "--reference is used with --eval")
    assert_one_line_error(run_cli("compare", outputs / "pruned", "--plot", tmp_path / "no" / "p.png"),
                          "does not exist")
    assert_one_line_error(run_cli("compare", outputs / "quantized", "--plot", tmp_path / "p.png"),
                          "nothing to plot")
    assert_one_line_error(run_cli("compare", outputs / "pruned", "--eval", "wikitext2", "--seqlen", "0"),
                          "--seqlen must be a positive integer")
    assert not (tmp_path / "p.png").exists()
