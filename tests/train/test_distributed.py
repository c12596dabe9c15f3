"""The same loop on two CPU processes (gloo, launched by torchrun) against one process.

Two processes with micro-batch B and one process with micro-batch 2B see the same global batch per
step (the loop's data order depends on the step only) and, with the loss normalised by the global
label count, take the same gradient.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is faster on a shared CPU


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COMPRESS_PROGRESS": "0", "PYTHONPATH": str(REPO)}
    # torchrun, not `accelerate launch --cpu`: accelerate 1.x runs a single process for --cpu unless MPI
    # is configured. The Accelerator inside picks up torchrun's env (RANK, WORLD_SIZE) and uses gloo.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(REPO / "tests" / "helpers" / "dist_adapt_worker.py"), str(out), "3"]
    done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def test_both_ranks_end_with_the_same_weights(two_process_run):
    a = load_file(str(two_process_run / "rank0.safetensors"))
    b = load_file(str(two_process_run / "rank1.safetensors"))
    assert a.keys() == b.keys() and len(a) == 14  # 2 layers x 7 projections
    for name in a:
        assert torch.equal(a[name], b[name]), name  # DDP all-reduces the same gradient to both ranks
    assert json.loads((two_process_run / "losses0.json").read_text())["processes"] == 2


def test_two_processes_match_one_process_with_the_same_global_batch(two_process_run):
    from tests.helpers.dist_adapt_worker import run

    state, result, _ = run(batch_size=6)  # one process, global batch 6 = 2 x 3
    assert result.processes == 1
    losses = json.loads((two_process_run / "losses0.json").read_text())
    assert [s for s, _ in losses["train"]] == [1, 2, 3, 4]
    # Loss per step: the same token-mean over the same 6 examples; only summation order differs.
    assert [l for _, l in losses["train"]] == pytest.approx([l for _, l in result.train_losses], abs=1e-5)
    assert [l for _, l in losses["eval"]] == pytest.approx([l for _, l in result.eval_losses], abs=1e-5)
    distributed = load_file(str(two_process_run / "rank0.safetensors"))
    for name, value in state.items():
        assert torch.allclose(distributed[name], value, atol=1e-5, rtol=0), name
    assert max(float(v.abs().max()) for v in state.values()) > 1e-3  # training moved the adapter


def test_both_ranks_resume_from_a_checkpoint_to_the_same_weights(two_process_run):
    """Checkpoints written by the main process (safetensors and JSON only, no pickle) are read by both
    ranks: resuming from step 2 ends with the uninterrupted run's weights."""
    files = json.loads((two_process_run / "ckpt-files.json").read_text())
    assert files == ["DONE", "model.safetensors", "optimizer.json", "optimizer.safetensors", "scheduler.json",
                     "train_state.json"]
    straight = load_file(str(two_process_run / "rank0.safetensors"))
    for rank in (0, 1):
        resumed = load_file(str(two_process_run / f"rank{rank}-resumed.safetensors"))
        assert resumed.keys() == straight.keys()
        for name, value in straight.items():
            assert torch.allclose(resumed[name], value, atol=1e-7, rtol=0), (rank, name)
