"""``compress adapt``: train a Bone, Bat or LoRA adapter and write it (peft format, or merged)."""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

import click

from compress.cli.common import device_option, print_table
from compress.errors import CompressError

log = logging.getLogger(__name__)


@click.command("adapt")
@click.argument("model")
@click.option("--method", type=click.Choice(["bone", "bat", "lora"]), required=True,
              help="bone: peft MiSS default (Bone form); bat: weight-guided W·B+B; lora: LoRA.")
@click.option("--r", "r", type=int, required=True, help="Block size (Bone/Bat) or rank (LoRA).")
@click.option("--data", required=True, help="JSONL instruction/response pairs ({'instruction','response'}) "
                                            "or {'text'} rows, or a plain text file.")
@click.option("--out", required=True, help="Output folder (a peft adapter; with --merge, merged full weights).")
@click.option("--merge", is_flag=True, help="Write merged full weights that transformers loads "
                                            "(the adapter goes to OUT/adapter).")
@click.option("--steps", type=int, default=100, show_default=True, help="Optimizer steps.")
@click.option("--lr", type=float, default=1e-4, show_default=True, help="Peak learning rate (AdamW).")
@click.option("--batch-size", type=int, default=8, show_default=True, help="Examples per micro-batch and process.")
@click.option("--grad-accum", type=int, default=1, show_default=True, help="Micro-batches per optimizer step.")
@click.option("--seqlen", type=int, default=512, show_default=True, help="Longest training sequence (tokens).")
@click.option("--eval-fraction", type=float, default=0.05, show_default=True,
              help="Share of the examples held out for the evaluation loss.")
@click.option("--eval-every", type=int, default=0, show_default=True, help="Evaluate every N steps (0: start/end).")
@click.option("--warmup-steps", type=int, default=0, show_default=True, help="Linear learning-rate warm-up.")
@click.option("--targets", default=",".join(("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                             "down_proj")), show_default=True,
              help="Comma-separated Linear module names to adapt.")
@click.option("--lora-alpha", type=float, default=None, help="LoRA alpha (default 2r).")
@click.option("--system", default=None, help="System prompt for the chat template (default: the template's).")
@click.option("--save-every", type=int, default=0, show_default=True,
              help="Checkpoint every N steps into --checkpoint-dir (0: none).")
@click.option("--checkpoint-dir", default=None, help="Checkpoint folder (default: OUT.checkpoints).")
@click.option("--resume", is_flag=True, help="Continue from the latest checkpoint in --checkpoint-dir.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the split, data order and init.")
@click.option("--force", is_flag=True, help="Replace an existing --out.")
@device_option
def adapt_command(model, method, r, data, out, merge, steps, lr, batch_size, grad_accum, seqlen, eval_fraction,
                  eval_every, warmup_steps, targets, lora_alpha, system, save_every, checkpoint_dir, resume, seed,
                  force, device):
    """Train a block-affine (Bone/Bat) or LoRA adapter on MODEL with --data.

    Runs on one process, or on several under `accelerate launch` (DDP). Prompt tokens are masked from
    the loss. MODEL is a Hugging Face folder, a GGUF file or the alias smollm2-135m.
    """
    from compress.export import check_output_path, check_separate
    from compress.plugin import build_method
    from compress.methods.bone.adapter import check_rank, targeted_linears
    from compress.models import load_model
    from compress.plugin import RunContext
    from compress.train.data import load_examples, split_examples
    from compress.train.loop import TrainConfig, make_accelerator

    train_config = TrainConfig(steps=steps, lr=lr, batch_size=batch_size, grad_accum=grad_accum,
                               warmup_steps=warmup_steps, eval_every=eval_every, save_every=save_every, seed=seed)
    train_config.check()
    target_list = [t.strip() for t in targets.split(",") if t.strip()]
    method_obj = build_method(method, {"r": r, "targets": target_list, "lora_alpha": lora_alpha})
    out_path = Path(out).expanduser().resolve()
    inputs = [model, data]
    check_separate(out_path, inputs, "output", "--out")
    if not resume:
        check_output_path(out_path, inputs, force)
    ckpt = Path(checkpoint_dir).expanduser().resolve() if checkpoint_dir else out_path.with_name(out_path.name + ".checkpoints")
    uses_ckpt = bool(save_every or resume)
    if uses_ckpt:  # before any work: never an input's or the output's folder, never someone else's step-*
        check_checkpoint_dir(ckpt, inputs, out_path)
    loaded = load_model(model)
    check_output_path(out_path, [loaded.path, *inputs], force)
    if uses_ckpt:
        check_separate(ckpt, [loaded.path], "checkpoint folder", "--checkpoint-dir")
    check_rank(method, r, targeted_linears(loaded.model, target_list))
    examples = load_examples(data, loaded.tokenizer, seqlen, system)
    train_set, eval_set = split_examples(examples, eval_fraction, seed)
    pad_id = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else 0

    accelerator = make_accelerator(grad_accum, device)
    if save_every and accelerator.is_main_process:
        claim_checkpoint_dir(ckpt)
    accelerator.wait_for_everyone()
    ran = method_obj.run(RunContext(  # a damaged checkpoint to --resume from is the loop's CompressError
        model=loaded.model, tokenizer=loaded.tokenizer, device=accelerator.device, source=str(model), seed=seed,
        out=out_path, extras={"train_examples": train_set, "eval_examples": eval_set, "train_config": train_config,
                              "pad_id": pad_id, "accelerator": accelerator,
                              "checkpoint_dir": ckpt if uses_ckpt else None, "resume": resume}))
    result = ran["result"]
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        peft_model = accelerator.unwrap_model(ran["model"])
        record = {
            "command": "adapt", "source_model": str(model), "source_path": str(loaded.path), "method": method,
            "adapter": {"r": r, "targets": target_list, "lora_alpha": lora_alpha,
                        "peft_type": type(peft_model.peft_config["default"]).__name__},
            "train": {**vars(train_config), "seqlen": seqlen, "data": str(data), "train_examples": len(train_set),
                      "eval_examples": len(eval_set), "processes": result.processes},
            "metrics": {"trainable_parameters": ran["trainable_parameters"],
                        "final_train_loss": result.final_train_loss, "final_eval_loss": result.final_eval_loss,
                        "train_losses": result.train_losses, "eval_losses": result.eval_losses,
                        "seconds_per_step": result.seconds_per_step, "tokens_per_second": result.tokens_per_second,
                        "peak_memory_bytes": result.peak_memory_bytes},
            "output": "merged" if merge else "adapter",
        }
        write_outputs(peft_model, loaded, out_path, record, merge, force or resume)
        if uses_ckpt:
            remove_own_checkpoints(ckpt)  # the output now holds everything; nothing else is touched
        first_eval = result.eval_losses[0][1] if result.eval_losses else None
        print_table([("method", method), ("r", r), ("trainable parameters", ran["trainable_parameters"]),
                     ("steps", result.steps), ("final train loss", result.final_train_loss),
                     ("eval loss (start)", first_eval), ("eval loss (end)", result.final_eval_loss),
                     ("seconds/step", result.seconds_per_step), ("tokens/s", result.tokens_per_second),
                     ("output", str(out_path))], ("metric", "value"))
    accelerator.wait_for_everyone()


# ---------------------------------------------------------------- the checkpoint folder
#
# compress removes only what it wrote: the ``step-N`` folders of compress.train.loop (each completed
# one holds a ``DONE`` file with its step; ``.step-N.tmp`` is one it was writing) and, when it
# created the folder itself (it then leaves
# CHECKPOINTS_MARKER in it), the folder once it is empty. A folder the user named keeps the rest.

CHECKPOINTS_MARKER = ".compress-checkpoints"


def _checkpoint_entries(ckpt: Path) -> tuple[list[Path], list[Path]]:
    """(compress's own step-N folders, other step-* entries) in ``ckpt``."""
    from compress.train.loop import CHECKPOINT_PREFIX

    if not ckpt.is_dir():
        return [], []
    marked = (ckpt / CHECKPOINTS_MARKER).is_file()
    own, foreign = [], []
    for entry in sorted(ckpt.iterdir()):
        if re.fullmatch(rf"\.{re.escape(CHECKPOINT_PREFIX)}\d+\.tmp", entry.name) and entry.is_dir() \
                and not entry.is_symlink():
            own.append(entry)  # the loop's temporary folder of a checkpoint it was writing when killed
            continue
        if not entry.name.startswith(CHECKPOINT_PREFIX):
            continue
        match = re.fullmatch(rf"{re.escape(CHECKPOINT_PREFIX)}(\d+)", entry.name)
        ours = (match is not None and entry.is_dir() and not entry.is_symlink()
                and (marked or _done_step(entry) == int(match.group(1))))
        (own if ours else foreign).append(entry)
    return own, foreign


def _done_step(folder: Path) -> int | None:
    try:
        return int((folder / "DONE").read_text().strip())
    except (OSError, ValueError):
        return None


def check_checkpoint_dir(ckpt: Path, inputs: list, out: Path) -> None:
    """Before any work: the checkpoint folder is not, does not contain and does not lie inside an input
    or the output, is a folder, and holds no ``step-*`` entries that compress did not write (the
    training loop keeps only its latest checkpoints and removes older ``step-*`` folders)."""
    from compress.export import check_separate, overlap

    check_separate(ckpt, inputs, "checkpoint folder", "--checkpoint-dir")
    if overlap(ckpt, out):
        raise CompressError(f"checkpoint folder {ckpt} would overwrite or sit inside the output {out}; "
                            "choose another --checkpoint-dir")
    if ckpt.exists() and not ckpt.is_dir():
        raise CompressError(f"checkpoint folder {ckpt} exists and is not a folder; choose another --checkpoint-dir")
    _, foreign = _checkpoint_entries(ckpt)
    if foreign:
        raise CompressError(f"checkpoint folder {ckpt} holds {foreign[0].name}, which compress did not write; "
                            "choose another --checkpoint-dir (compress keeps and removes step-* folders there)")


def claim_checkpoint_dir(ckpt: Path) -> None:
    """Create the checkpoint folder if missing, marked as compress's own (removed when done)."""
    if ckpt.exists():
        return
    try:
        ckpt.mkdir(parents=True)
        (ckpt / CHECKPOINTS_MARKER).write_text("created by compress adapt; removed with its checkpoints\n")
    except FileExistsError:
        pass
    except OSError as exc:
        raise CompressError(f"cannot create the checkpoint folder {ckpt}: {exc.strerror}") from None


def remove_own_checkpoints(ckpt: Path) -> None:
    """Remove the step-N folders compress wrote in ``ckpt``, and ``ckpt`` itself if compress created it
    and nothing else is left in it."""
    own, _ = _checkpoint_entries(ckpt)
    for folder in own:
        shutil.rmtree(folder, ignore_errors=True)
    marker = ckpt / CHECKPOINTS_MARKER
    if marker.is_file():
        try:
            marker.unlink()
            ckpt.rmdir()  # only when empty
        except OSError:
            pass


def write_outputs(peft_model, loaded, out: Path, record: dict, merge: bool, force: bool) -> None:
    """The adapter in peft format (OUT, or OUT/adapter with --merge) and, with --merge, merged weights
    (the ``peft`` exporter, whose base is the local base folder)."""
    from compress.exporters import get_exporter

    get_exporter("peft").save(peft_model, loaded.tokenizer, out, record, source=loaded.path, force=force,
                              options={"merge": merge, "base": str(loaded.path)})


def register(group: click.Group) -> None:
    group.add_command(adapt_command)
