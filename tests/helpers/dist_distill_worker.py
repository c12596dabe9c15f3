"""Worker for tests/distill/test_distributed.py: a whole Zebra-Llama distillation of a tiny Llama.

Run by ``python -m torch.distributed.run --nproc_per_node N tests/helpers/dist_distill_worker.py MODEL DATA OUT
BATCH`` (each rank writes OUT/rank<k>.safetensors, the trained hybrid's weights, and OUT/record<k>.json), or
imported and called with one process. ILD splits the layers between the processes; KD is data-parallel
with BATCH windows per process.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from compress.distill.config import DistillConfig  # noqa: E402
from compress.distill.run import Distillation  # noqa: E402
from compress.models import load_model  # noqa: E402
from compress.train.loop import make_accelerator  # noqa: E402

# 2 layers; 32-token windows: 8 for ILD in steps of 4 whatever the processes, 2 held out, 4 KD steps of 4
SETTINGS = dict(seqlen=32, ild_tokens=256, ild_batch_size=4, smart_tokens=64, kd_tokens=512, n_mla=1, save_every=0,
                lr=1e-3)


def run(model: str, data: str, state_dir: str, batch_size: int):
    """Distil and return (the hybrid's weights, the record, the accelerator)."""
    loaded = load_model(model)
    accelerator = make_accelerator(1, "cpu")
    config = DistillConfig(data=data, batch_size=batch_size, state_dir=state_dir, **SETTINGS)
    result = Distillation(loaded.model, loaded.tokenizer, config, None, source=model, accelerator=accelerator).run()
    state = {n: t.detach().clone().contiguous() for n, t in result.model.state_dict().items()}
    return state, result.record, accelerator


def main(model: str, data: str, out: str, batch_size: int) -> None:
    from safetensors.torch import save_file

    torch.set_num_threads(1)  # two ranks on a shared 2-core machine
    state, record, accelerator = run(model, data, str(Path(out) / "state"), batch_size)
    rank = accelerator.process_index
    save_file(state, str(Path(out) / f"rank{rank}.safetensors"))
    (Path(out) / f"record{rank}.json").write_text(json.dumps(record, default=str))
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
