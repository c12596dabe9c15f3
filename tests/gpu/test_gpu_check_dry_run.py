"""evaluation/gpu_check.sh --dry-run end to end on the CPU (not GPU-marked): every step of the GPU check
runs at tiny sizes, so the script cannot rot between the rare runs on a GPU machine."""

from __future__ import annotations

import json
import os
import subprocess

from tests.helpers import REPO

STEPS = ["install", "tests", "scale", "smoke"]


def test_gpu_check_dry_run_writes_every_steps_output(tmp_path):
    results = tmp_path / "gpu-dry"
    env = dict(os.environ, RESULTS=str(results), PYTHON=str(REPO / ".venv" / "bin" / "python"),
               OMP_NUM_THREADS="1")
    proc = subprocess.run(["bash", str(REPO / "evaluation" / "gpu_check.sh"), "--dry-run"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    summary = (results / "summary.md").read_text()
    assert proc.returncode == 0, summary + proc.stdout[-4000:] + proc.stderr[-2000:]
    for step in STEPS:  # each step logged and ok
        assert (results / f"{step}.log").stat().st_size > 0, step
        assert f"| {step} | ok |" in summary, summary
    assert "passed" in (results / "tests.log").read_text() and (results / "tests.xml").exists()
    rows = json.loads((results / "scale.json").read_text())
    assert [r["method"] for r in rows] == ["empty", "gptq", "slimgpt", "flap", "ild"]
    assert all(r["layers"] and r["host_formula"]["total"] > 0 for r in rows)
    assert "| method | calibration | layer |" in (results / "scale.md").read_text()
    for kind in ("gptq", "slimgpt", "hybrid"):
        assert (results / f"smoke-{kind}" / "config.json").exists(), kind
    assert "kv_cache_fraction" in (results / "smoke.log").read_text() and (results / "env.txt").exists()
