"""Worker for test_train_distributed: train a Bone adapter on a tiny Llama, dump this rank's result.

Run by ``python -m torch.distributed.run --nproc_per_node N tests/helpers/dist_adapt_worker.py OUT BATCH`` (each
rank writes OUT/rank<k>.safetensors and OUT/losses<k>.json; checkpoints go to OUT/ckpt, and each rank then
resumes from the step-2 checkpoint and writes OUT/rank<k>-resumed.safetensors), or imported and called
with one process.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from compress.methods.bone.adapter import attach_adapter  # noqa: E402
from compress.train.data import pair_example  # noqa: E402
from compress.train.loop import TrainConfig, make_accelerator, train  # noqa: E402
from tests.helpers.adapt import reverse_task, smollm2_tokenizer, tiny_llama  # noqa: E402

STEPS = 4


def run(batch_size: int, method: str = "bat", checkpoint_dir: Path | None = None, save_every: int = 0,
        resume: bool = False):
    """Train and return (adapter state, result, accelerator)."""
    tok = smollm2_tokenizer()
    examples = [pair_example(tok, r["instruction"], r["response"], 64, "") for r in reverse_task(30, seed=11)]
    model = attach_adapter(tiny_llama(seed=2), method, 8)
    accelerator = make_accelerator(1, "cpu")
    config = TrainConfig(steps=STEPS, lr=5e-3, batch_size=batch_size, seed=9, save_every=save_every)
    result = train(model, examples[:24], examples[24:], config, pad_id=2, accelerator=accelerator,
                   checkpoint_dir=checkpoint_dir, resume=resume)
    state = {n: p.detach().clone().contiguous() for n, p in accelerator.unwrap_model(model).named_parameters()
             if p.requires_grad}
    return state, result, accelerator


def main(out: str, batch_size: int) -> None:
    from safetensors.torch import save_file

    torch.set_num_threads(1)  # two ranks on a shared 2-core machine
    ckpt = Path(out) / "ckpt"
    state, result, accelerator = run(batch_size, checkpoint_dir=ckpt, save_every=2)  # steps 2 and 4 (main writes)
    rank = accelerator.process_index
    save_file(state, str(Path(out) / f"rank{rank}.safetensors"))
    (Path(out) / f"losses{rank}.json").write_text(json.dumps({
        "train": result.train_losses, "eval": result.eval_losses, "processes": result.processes}))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:  # both ranks resume from step 2 and train steps 3 and 4 again
        (Path(out) / "ckpt-files.json").write_text(json.dumps(sorted(p.name for p in (ckpt / "step-000002").iterdir())))
        shutil.rmtree(ckpt / "step-000004")
    accelerator.wait_for_everyone()
    resumed, _, accelerator = run(batch_size, checkpoint_dir=ckpt, resume=True)
    save_file(resumed, str(Path(out) / f"rank{rank}-resumed.safetensors"))
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
