"""The ``transfer`` method for recipes and the Python API: add a diff to an in-memory model.

The model in memory is the target base; Δ is streamed from the source checkpoints block by block,
with the same plan, checks and float64 arithmetic as ``compress transfer``. A vocabulary change
(added tokens) needs new rows and so a new model: use the command (or ``transfer()``) for that.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from compress.errors import CompressError, ConfigError
from compress.methods.base import ModelMethod, config_field, register
from compress.transfer.plan import check_architectures, plan_tensors
from compress.transfer.streaming import (CheckpointDiff, TransferOptions, resolve_inputs, row_blocks,
                                         transferred_block)
from compress.transfer.checkpoint import Checkpoint
from compress.transfer.report import TensorStats, CompatibilityReport


@dataclass
class TransferConfig:
    source_base: str = config_field("", "Base model of the source version (folder, GGUF or alias).")
    source_ft: str = config_field("", "Fine-tuned model of the source version.")
    scale: float = config_field(1.0, "λ: the model becomes θ + λ·(θ_ft − θ_base).")
    include: str | None = config_field(None, "Regex: only tensors whose name matches get the diff.")
    exclude: str | None = config_field(None, "Regex: tensors whose name matches are left unchanged.")
    vocab: Literal["pad", "truncate", "error"] = config_field("error", "In memory rows cannot be added: "
                                                              "a vocabulary mismatch is an error.")
    rank: int | None = config_field(None, "Keep a rank-K truncated SVD of each matrix's diff.")

    def __post_init__(self):
        if not self.source_base or not self.source_ft:
            raise ConfigError("fields 'source_base' and 'source_ft' are required")
        if self.rank is not None and self.rank <= 0:
            raise ConfigError(f"field 'rank' must be a positive integer, got {self.rank}")


class StateDictTarget:
    """The in-memory model seen through the reader interface of a checkpoint (tied copies skipped)."""

    label = "target base"

    def __init__(self, model: torch.nn.Module):
        self.state, self.tensors, seen = {}, {}, set()
        for name, tensor in model.state_dict().items():
            if tensor.data_ptr() in seen:  # a tied weight (lm_head = embed_tokens) is written once
                continue
            seen.add(tensor.data_ptr())
            self.state[name] = tensor
            self.tensors[name] = _Info(tensor.dtype, tuple(tensor.shape))

    def info(self, name):
        return self.tensors[name]

    def read(self, name, start=0, stop=None):
        tensor = self.state[name]
        return tensor.reshape(1) if tensor.dim() == 0 else tensor[start:stop].cpu()


@dataclass
class _Info:
    dtype: torch.dtype
    shape: tuple

    @property
    def row_shape(self):
        return self.shape[1:]


@register
class FineTuningTransfer(ModelMethod):
    name = "transfer"
    help = "Add a fine-tuning diff (θ_ft − θ_base) of another model version to this model."
    Config = TransferConfig

    @torch.no_grad()
    def run(self, model: torch.nn.Module, **context) -> dict:
        cfg = self.config
        folders = resolve_inputs({"source base": cfg.source_base, "source fine-tuned model": cfg.source_ft})
        base, ft = (Checkpoint(folder, label) for label, folder in folders.items())
        check_architectures({"source base": base.config(), "source fine-tuned model": ft.config(),
                             "target base": model.config.to_dict()})
        source, target = CheckpointDiff(base, ft, cfg.rank), StateDictTarget(model)
        plans = plan_tensors(source, target, cfg.include, cfg.exclude, cfg.vocab)
        options = TransferOptions(scale=cfg.scale, rank=cfg.rank)
        report = CompatibilityReport()
        for plan in plans:
            if not plan.transfer:
                continue
            if plan.shape != target.info(plan.name).shape:
                raise CompressError(f"{plan.name}: the vocabulary changes ({plan.rows}); an in-memory model "
                                    f"cannot grow rows, use compress transfer")
            stats, tensor = TensorStats(plan.name), target.state[plan.name]
            for a, b in row_blocks(plan.shape, options.block_bytes):
                block = transferred_block(plan, source, target, cfg.scale, a, b, stats)
                if tensor.dim() == 0:
                    tensor.copy_(block.reshape(()))
                else:
                    tensor[a:b].copy_(block.to(tensor.dtype))
            stats.kept_energy = source.kept_energy(plan.name)
            report.tensors.append(stats)
        return {"report": report.as_dict()}
