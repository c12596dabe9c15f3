"""Assemble a hybrid from ILD'd mixers, and Zebra-Llama's end-to-end knowledge distillation.

:func:`assemble` builds the hybrid with :func:`compress.hybrid.build.hybridize` (the teacher's norms, MLPs
and embeddings; each layer's mixer of the kind asked for) and loads every MLA / Mamba2 layer's mixer
from the ILD bank (``bank[layer][kind]``, the state dicts :mod:`compress.distill.ild` trained); layers
of kind ``attention`` keep the teacher's attention.

:func:`train_kd` is the shared training loop (:func:`compress.train.loop.train`) with
:class:`compress.train.losses.KLDistillLoss` at temperature 1: KL(teacher ‖ student) over the full
vocabulary at every position of every window, all the student's parameters trainable. One process or
many (``accelerate launch``: DDP; gloo on CPU); the global batch is ``batch_size × grad_accum ×
processes`` windows, so a step means the same thing for any split, and a killed run resumes from its
latest checkpoint to the same weights (the loop's guarantees).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import nn

from compress.errors import CompressError


def assemble(teacher: nn.Module, bank: dict, layer_types: list[str], ranks: tuple[int, int, int],
             seed: int = 0) -> nn.Module:
    """The hybrid with ``layer_types`` (attention / mla / mamba2 per layer) whose MLA and Mamba2 mixers are
    the ILD'd ones in ``bank``. The teacher is not changed."""
    from compress.hybrid.build import hybridize

    mla = [i for i, t in enumerate(layer_types) if t == "mla"]
    mamba = [i for i, t in enumerate(layer_types) if t == "mamba2"]
    q_rank, kv_rank, rope_dim = ranks
    hybrid = hybridize(teacher, mla_layers=mla, mamba_layers=mamba, q_rank=q_rank, kv_rank=kv_rank,
                       rope_dim=rope_dim, seed=seed)
    for index in sorted(mla + mamba):
        kind = layer_types[index]
        tensors = bank.get(index, {}).get(kind)
        if tensors is None:
            raise CompressError(f"layer {index} has no ILD'd {kind} mixer; run the layer-wise distillation with "
                                f"{kind} mixers first")
        load_mixer(hybrid.model.layers[index].self_attn, tensors)
    return hybrid


def load_mixer(mixer: nn.Module, tensors: dict[str, torch.Tensor]) -> nn.Module:
    """Copy a bank entry into ``mixer`` (same class and shapes), keeping the mixer's dtype and device."""
    param = next(mixer.parameters())
    mixer.load_state_dict({k: v.to(param.device, param.dtype) for k, v in tensors.items()}, strict=True)
    return mixer


def window_examples(tokens: torch.Tensor) -> list:
    """Training examples from (N, L) token windows: every position is scored (labels = the tokens)."""
    from compress.train.data import Example

    return [Example(row.tolist(), row.tolist()) for row in tokens]


def train_kd(student: nn.Module, teacher: nn.Module, train_tokens: torch.Tensor, eval_tokens: torch.Tensor | None,
             config, accelerator, checkpoint_dir: Path | None = None,
             on_step: Callable | None = None):
    """End-to-end KD of ``student`` from ``teacher`` on ``train_tokens`` windows (module docstring);
    ``config`` is a :class:`compress.train.loop.TrainConfig`. Continues from the latest checkpoint in
    ``checkpoint_dir`` when there is one. Returns the loop's TrainResult; ``student`` is trained in place."""
    from compress.train.checkpoint import latest_checkpoint
    from compress.train.loop import train
    from compress.train.losses import KLDistillLoss

    for p in student.parameters():
        p.requires_grad_(True)
    resume = latest_checkpoint(checkpoint_dir) is not None
    result = train(student, window_examples(train_tokens),
                   window_examples(eval_tokens) if eval_tokens is not None else [], config, pad_id=0,
                   accelerator=accelerator, checkpoint_dir=checkpoint_dir, resume=resume, on_step=on_step,
                   loss=KLDistillLoss(teacher, temperature=1.0))
    accelerator.unwrap_model(student, keep_fp32_wrapper=False)  # drops accelerate's autocast wrapper (CUDA)
    student.eval()
    for p in student.parameters():
        p.requires_grad_(False)
    return result
