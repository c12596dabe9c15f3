"""The ``transfer`` method for recipes and the Python API: add a diff to an in-memory model.

The model in memory (``ctx.model``) is the target base; Δ is streamed from the source checkpoints
block by block, with the same plan, checks and float64 arithmetic as ``compress transfer``. A
vocabulary change (added tokens) needs new rows and so a new model: use the command (or
``transfer()``) for that. Its Config is :class:`~compress.methods.transfer.options.TransferOptions`,
the same type as the command's; ``vocab`` defaults to ``error`` here (``pad`` for a checkpoint).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compress.errors import CompressError
from compress.plugin import ModelMethod, RunContext, register
from compress.methods.transfer.checkpoint import Checkpoint
from compress.methods.transfer.options import TransferOptions
from compress.methods.transfer.plan import check_architectures, plan_tensors
from compress.methods.transfer.report import CompatibilityReport, TensorStats
from compress.methods.transfer.streaming import CheckpointDiff, resolve_inputs, row_blocks, transferred_block


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
    Config = TransferOptions

    def __init__(self, config: TransferOptions | None = None):
        super().__init__(config)
        self.config.check(method=f"method {self.name}")  # both sources given, values valid, no shard options
        # the in-memory default of vocab (error), made explicit so the recipe's record shows it
        self.config = self.config.replace(vocab=self.config.resolved_vocab(in_memory=True))

    def input_paths(self) -> list[str]:
        """The source base and fine-tuned checkpoints the diff is read from."""
        return [p for p in (self.config.source_base, self.config.source_ft) if p]

    @torch.no_grad()
    def run(self, ctx: RunContext) -> dict:
        """Add λ·Δ to ``ctx.model``'s weights in place (on whatever device they are); the record
        holds the compatibility report."""
        cfg, model = self.config, ctx.model
        folders = resolve_inputs({"source base": cfg.source_base, "source fine-tuned model": cfg.source_ft})
        base, ft = (Checkpoint(folder, label) for label, folder in folders.items())
        check_architectures({"source base": base.config(), "source fine-tuned model": ft.config(),
                             "target base": model.config.to_dict()})
        source, target = CheckpointDiff(base, ft, cfg.rank), StateDictTarget(model)
        plans = plan_tensors(source, target, cfg.include, cfg.exclude, cfg.resolved_vocab(in_memory=True))
        report = CompatibilityReport(warn_drift=cfg.warn_drift, warn_cosine=cfg.warn_cosine)
        for plan in plans:
            if not plan.transfer:
                continue
            if plan.shape != target.info(plan.name).shape:
                raise CompressError(f"{plan.name}: the vocabulary changes ({plan.rows}); an in-memory model "
                                    f"cannot grow rows, use compress transfer")
            stats, tensor = TensorStats(plan.name), target.state[plan.name]
            for a, b in row_blocks(plan.shape, cfg.block_bytes):
                block = transferred_block(plan, source, target, cfg.scale, a, b, stats)
                if tensor.dim() == 0:
                    tensor.copy_(block.reshape(()))
                else:
                    tensor[a:b].copy_(block.to(tensor.dtype))
            stats.kept_energy = source.kept_energy(plan.name)
            report.tensors.append(stats)
        return {"report": report.as_dict()}
