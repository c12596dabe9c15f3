"""The training loop on accelerate, shared by adapters (Bone, LoRA) and later distillation and NAS.

One loop for one process or many (``accelerate launch``: DDP, gloo on CPU, NCCL on GPU); it has no
distributed code of its own. float32 on CPU, bf16 autocast on GPU.

Determinism (a killed run resumes to the same final weights): the data order is a function of the
optimizer step alone (each epoch a permutation seeded by ``seed + epoch``; optimizer step ``s`` takes
the global positions ``[s*G, (s+1)*G)`` with ``G = batch_size * grad_accum * processes``), and the
torch RNG is reseeded from ``(seed, step, rank)`` at every step, so nothing but the trainable
parameters, the optimizer, the scheduler and the step counter needs restoring.

Checkpoints (``step-NNNNNN/``) hold no pickle: safetensors and JSON only (:mod:`compress.train.checkpoint`).

The loss is a parameter (:mod:`compress.train.losses`; default next-token cross-entropy, also
distillation to a teacher's logits or hidden states). The loss of a step is its mean over the whole
global batch (all micro-batches of all processes): each micro-batch's sum is divided by the global
count of scored positions, known before the step from the examples (``loss.example_count``), so one
process with batch 2B and two processes with batch B take the same gradient.
"""

from __future__ import annotations

import logging
import math
import resource
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable

import torch

from compress.errors import CompressError
from compress.train.checkpoint import CHECKPOINT_PREFIX, latest_checkpoint, load_checkpoint, save_checkpoint  # noqa: F401
from compress.train.data import Example, collate
from compress.train.losses import CrossEntropyLoss, TrainLoss, example_label_count, token_loss_sum  # noqa: F401

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Hyper-parameters of one training run (batch_size is per process and micro-batch)."""

    steps: int = 100
    lr: float = 1e-4
    batch_size: int = 8
    grad_accum: int = 1
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # 0 disables clipping
    eval_every: int = 0  # 0: evaluate only at the start and the end
    save_every: int = 0  # 0: no checkpoints
    keep_checkpoints: int = 2
    seed: int = 0

    def check(self) -> None:
        for name in ("steps", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise CompressError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not self.lr > 0 or not math.isfinite(self.lr):
            raise CompressError(f"--lr must be a positive number, got {self.lr}")
        for name in ("warmup_steps", "eval_every", "save_every"):
            if getattr(self, name) < 0:
                raise CompressError(f"--{name.replace('_', '-')} must be 0 or more, got {getattr(self, name)}")


@dataclass
class TrainState:
    """What a checkpoint holds besides model/optimizer/scheduler: the step and the loss history."""

    step: int = 0
    train_losses: list = field(default_factory=list)  # [step, loss]
    eval_losses: list = field(default_factory=list)  # [step, loss]
    tokens: int = 0
    seconds: float = 0.0

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        names = {f.name for f in fields(self)}
        if not isinstance(state, dict) or set(state) != names:
            raise ValueError(f"train state keys {sorted(state) if isinstance(state, dict) else state!r}, "
                             f"expected {sorted(names)}")
        for key, value in state.items():
            setattr(self, key, value)


@dataclass
class TrainResult:
    steps: int
    train_losses: list
    eval_losses: list
    final_train_loss: float | None
    final_eval_loss: float | None
    seconds_per_step: float
    tokens_per_second: float
    peak_memory_bytes: int
    processes: int


def make_accelerator(grad_accum: int = 1, device: str = "auto"):
    """An Accelerator: bf16 autocast on CUDA, float32 on CPU."""
    from accelerate import Accelerator

    cpu = device == "cpu" or not torch.cuda.is_available()
    return Accelerator(gradient_accumulation_steps=grad_accum, mixed_precision="no" if cpu else "bf16", cpu=cpu)


def global_positions(step: int, n_examples: int, global_batch: int, seed: int) -> list[int]:
    """Example indices of optimizer step ``step`` in the seeded, epoch-wise shuffled stream."""
    out, cache = [], {}
    for pos in range(step * global_batch, (step + 1) * global_batch):
        epoch, offset = divmod(pos, n_examples)
        if epoch not in cache:
            cache[epoch] = torch.randperm(n_examples, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        out.append(cache[epoch][offset])
    return out


@torch.no_grad()
def evaluate_loss(model, examples: list[Example], batch_size: int, pad_id: int, accelerator,
                  loss: TrainLoss | None = None) -> float | None:
    """Mean of ``loss`` (default cross-entropy) per scored position over ``examples``, each process
    scoring its share."""
    if not examples:
        return None
    loss = CrossEntropyLoss() if loss is None else loss
    was_training = model.training
    model.eval()
    mine = examples[accelerator.process_index::accelerator.num_processes]
    total = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    for start in range(0, len(mine), batch_size):
        batch = {k: v.to(accelerator.device) for k, v in collate(mine[start:start + batch_size], pad_id).items()}
        with accelerator.autocast():
            loss_sum, count = loss(model, batch)
        total += torch.tensor([loss_sum.item(), count], dtype=torch.float64, device=accelerator.device)
    total = accelerator.reduce(total, "sum")
    model.train(was_training)
    return float(total[0] / total[1])


def _counter(loss) -> Callable[[Example], int]:
    """Positions ``loss`` scores in one example (a loss without ``example_count`` counts labelled positions)."""
    return getattr(loss, "example_count", example_label_count)


def _peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def train(model, train_examples: list[Example], eval_examples: list[Example], config: TrainConfig, pad_id: int,
          accelerator=None, checkpoint_dir: Path | None = None, resume: bool = False,
          on_step: Callable[[int, TrainState], None] | None = None, loss: TrainLoss | None = None) -> TrainResult:
    """Train the parameters of ``model`` that require grad. Returns losses and speed.

    ``loss`` (:mod:`compress.train.losses`; default :class:`CrossEntropyLoss`) is minimised and also
    reported on ``eval_examples``. ``on_step(step, state)`` runs after each optimizer step and its
    checkpoint (tests use it to kill a run). With ``resume`` the latest complete checkpoint in
    ``checkpoint_dir`` is restored first.
    """
    from compress.progress import bar

    config.check()
    if not train_examples:
        raise CompressError("no training examples")
    loss = CrossEntropyLoss() if loss is None else loss
    count_of = _counter(loss)
    accelerator = accelerator or make_accelerator(config.grad_accum)
    world, rank = accelerator.num_processes, accelerator.process_index
    torch.manual_seed(config.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise CompressError("the model has no trainable parameters")
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    # Linear warm-up then constant. Stepped by hand (not through accelerate, which steps a prepared
    # scheduler once per process) so a step means the same thing for any number of processes.
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / config.warmup_steps) if config.warmup_steps else 1.0)
    model, optimizer = accelerator.prepare(model, optimizer)
    state = TrainState()

    if resume:
        found = latest_checkpoint(checkpoint_dir)
        if found is None:
            log.warning("--resume: no checkpoint in %s, starting from step 0", checkpoint_dir)
        else:
            load_checkpoint(found, accelerator.unwrap_model(model), optimizer, scheduler, state)
            log.info("resumed from %s (step %d)", found, state.step)

    micro, accum = config.batch_size, config.grad_accum
    global_batch = micro * accum * world
    if state.step == 0 and not state.eval_losses and eval_examples:
        state.eval_losses.append([0, evaluate_loss(model, eval_examples, micro, pad_id, accelerator, loss)])
    model.train()
    progress = bar("training", total=config.steps, unit="step") if accelerator.is_main_process else None
    if progress is not None:
        progress.update(state.step)
    while state.step < config.steps:
        step = state.step
        started = time.perf_counter()
        torch.manual_seed(config.seed * 1_000_003 + step * 1009 + rank)  # dropout etc., restorable by step
        positions = global_positions(step, len(train_examples), global_batch, config.seed)
        n_labels = max(sum(count_of(train_examples[i]) for i in positions), 1)
        step_loss = torch.zeros((), dtype=torch.float64, device=accelerator.device)
        step_tokens = 0
        for m in range(accum):
            mine = positions[(m * world + rank) * micro:(m * world + rank + 1) * micro]
            batch = {k: v.to(accelerator.device) for k, v in
                     collate([train_examples[i] for i in mine], pad_id).items()}
            step_tokens += int(batch["attention_mask"].sum())
            with accelerator.accumulate(model):
                with accelerator.autocast():
                    loss_sum, count = loss(model, batch)
                expected = sum(count_of(train_examples[i]) for i in mine)
                if count != expected:  # the normalisation would be wrong: a bug in the loss, not user input
                    raise RuntimeError(f"{type(loss).__name__} scored {count} positions, its example_count says "
                                       f"{expected}")
                # accelerate divides by grad_accum and DDP averages over processes: undo both so the
                # gradient is that of (sum of the losses of the global batch) / (its count).
                accelerator.backward(loss_sum * (world * accum / n_labels))
                if accelerator.sync_gradients and config.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(params, config.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad()
            step_loss += loss_sum.detach().double()
        if not accelerator.sync_gradients:
            raise RuntimeError("gradient accumulation out of step with the optimizer")  # a bug, not user input
        scheduler.step()
        loss_value = float(accelerator.reduce(step_loss, "sum")) / n_labels
        if not math.isfinite(loss_value):
            raise CompressError(f"the training loss became {loss_value} at step {step + 1}; lower --lr")
        tokens = int(accelerator.reduce(torch.tensor(step_tokens, device=accelerator.device), "sum"))
        state.step = step + 1
        state.train_losses.append([state.step, loss_value])
        state.tokens += tokens
        state.seconds += time.perf_counter() - started
        if eval_examples and config.eval_every and state.step % config.eval_every == 0 and state.step < config.steps:
            state.eval_losses.append([state.step, evaluate_loss(model, eval_examples, micro, pad_id, accelerator, loss)])
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{loss_value:.4f}", tok_s=f"{state.tokens / max(state.seconds, 1e-9):.0f}")
        if checkpoint_dir is not None and config.save_every and state.step % config.save_every == 0:
            save_checkpoint(accelerator, checkpoint_dir, state.step, config.keep_checkpoints,
                            (model, optimizer, scheduler, state))
        if on_step is not None:
            on_step(state.step, state)
    if progress is not None:
        progress.close()
    if eval_examples and (not state.eval_losses or state.eval_losses[-1][0] != state.step):
        state.eval_losses.append([state.step, evaluate_loss(model, eval_examples, micro, pad_id, accelerator, loss)])
    steps_timed = max(len(state.train_losses), 1)
    return TrainResult(
        steps=state.step, train_losses=state.train_losses, eval_losses=state.eval_losses,
        final_train_loss=state.train_losses[-1][1] if state.train_losses else None,
        final_eval_loss=state.eval_losses[-1][1] if state.eval_losses else None,
        seconds_per_step=state.seconds / steps_timed, tokens_per_second=state.tokens / max(state.seconds, 1e-9),
        peak_memory_bytes=_peak_memory(accelerator.device), processes=world)
