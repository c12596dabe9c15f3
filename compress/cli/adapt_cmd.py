"""``compress adapt``: train a Bone, Bat or LoRA adapter and write it (peft format, or merged)."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import click

from compress.cli.common import device_option, print_table

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
    from compress.export import check_output_path
    from compress.methods.base import build_method
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
    if not resume:
        check_output_path(out_path, [model], force)
    loaded = load_model(model)
    check_output_path(out_path, [loaded.path], force)
    check_rank(method, r, targeted_linears(loaded.model, target_list))
    examples = load_examples(data, loaded.tokenizer, seqlen, system)
    train_set, eval_set = split_examples(examples, eval_fraction, seed)
    pad_id = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else 0
    ckpt = Path(checkpoint_dir).expanduser().resolve() if checkpoint_dir else out_path.with_name(out_path.name + ".checkpoints")

    accelerator = make_accelerator(grad_accum, device)
    ran = method_obj.run(RunContext(
        model=loaded.model, tokenizer=loaded.tokenizer, device=accelerator.device, source=str(model), seed=seed,
        out=out_path, extras={"train_examples": train_set, "eval_examples": eval_set, "train_config": train_config,
                              "pad_id": pad_id, "accelerator": accelerator,
                              "checkpoint_dir": ckpt if save_every or resume else None, "resume": resume}))
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
        if ckpt.exists() and (save_every or resume):
            shutil.rmtree(ckpt, ignore_errors=True)  # the output now holds everything
        first_eval = result.eval_losses[0][1] if result.eval_losses else None
        print_table([("method", method), ("r", r), ("trainable parameters", ran["trainable_parameters"]),
                     ("steps", result.steps), ("final train loss", result.final_train_loss),
                     ("eval loss (start)", first_eval), ("eval loss (end)", result.final_eval_loss),
                     ("seconds/step", result.seconds_per_step), ("tokens/s", result.tokens_per_second),
                     ("output", str(out_path))], ("metric", "value"))
    accelerator.wait_for_everyone()


def write_outputs(peft_model, loaded, out: Path, record: dict, merge: bool, force: bool) -> None:
    """The adapter in peft format (OUT, or OUT/adapter with --merge) and, with --merge, merged weights
    (the ``peft`` exporter, whose base is the local base folder)."""
    from compress.exporters import get_exporter

    get_exporter("peft").save(peft_model, loaded.tokenizer, out, record, source=loaded.path, force=force,
                              options={"merge": merge, "base": str(loaded.path)})


def register(group: click.Group) -> None:
    group.add_command(adapt_command)
