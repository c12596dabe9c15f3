"""The whole distillation on two CPU processes (gloo, torchrun) against one process with the same global batch.

Two processes split ILD's layers (layer i on process i mod 2) and run KD data-parallel with 2 windows
each; one process does every layer and KD with 4 windows. ILD is seeded per layer and runs on the
same ILD batches, and KD sees the same global batch per step: the hybrids agree to float tolerance.
"""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import REPO, WIKI_TRAIN
from tests.helpers.adapt import save_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = save_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=3)
    data = tmp_path_factory.mktemp("data") / "train.txt"
    data.write_text(WIKI_TRAIN.read_text()[:40000])
    return folder, data


def test_two_processes_match_one_process_with_the_same_global_batch(inputs, tmp_path):
    from tests.helpers.dist_distill_worker import run

    folder, data = inputs
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COMPRESS_PROGRESS": "0", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(REPO / "tests" / "helpers" / "dist_distill_worker.py"), str(folder), str(data), str(tmp_path), "2"]
    done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    rank0, rank1 = (load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1))
    assert rank0.keys() == rank1.keys() and all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    record = json.loads((tmp_path / "record0.json").read_text())
    assert record["kd"]["processes"] == 2 and record["windows"]["global_batch"] == 4
    assert [r["layer"] for r in record["ild"]["layers"]] == [0, 1]
    assert all("mla" in r and "mamba2" in r for r in record["ild"]["layers"])  # both layers' mixers gathered

    state, single, _ = run(str(folder), str(data), str(tmp_path / "single-state"), batch_size=4)
    assert single["kd"]["processes"] == 1 and single["windows"]["global_batch"] == 4
    for a, b in zip(single["ild"]["layers"], record["ild"]["layers"]):  # the same ILD, wherever a layer ran
        for kind in ("mla", "mamba2"):
            assert (a[kind]["before"], a[kind]["after"]) == pytest.approx((b[kind]["before"], b[kind]["after"]),
                                                                          rel=1e-6)
    two = [v for _, v in record["kd"]["train_losses"]]
    assert [v for _, v in single["kd"]["train_losses"]] == pytest.approx(two, abs=1e-5) and len(two) == 4
    for name, value in state.items():
        assert torch.allclose(rank0[name], value, atol=1e-5, rtol=0), name
    before = load_file(str(next(folder.glob("*.safetensors"))))
    moved = max((state[k] - before[k]).abs().max().item() for k in before if k in state and ".self_attn." not in k)
    assert moved > 1e-4  # KD trained the MLPs and norms too
