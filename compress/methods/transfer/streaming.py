"""Fine-tuning transfer, streamed: θ_out = θ_target + λ·(θ_ft − θ_base), tensor by tensor.

"Efficient Model Development through Fine-tuning Transfer" (Lin et al., 2025): the diff vector
Δ = θ_ft − θ_base of one model version, added to the base of another version, carries the
fine-tune over without training (λ = 1 and every tensor, embeddings, norms and lm_head included).

Each tensor is read in blocks of rows (at most ``block_bytes`` of float64 per operand), the
difference and the sum are computed in float64, the result is cast to the target's dtype and
appended to the output shard, so peak memory is a few blocks whatever the model's size. With
λ = 1 and target = source base the float64 sum rounds back to θ_ft exactly; with λ = 0 it is θ_target.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Callable

import torch

from compress.errors import CompressError
from compress.export import atomic_output, check_output_path, write_record
from compress.methods.transfer.checkpoint import Checkpoint, ShardedWriter
from compress.methods.transfer.lowrank import LowRankDelta, truncated_svd, wants_low_rank
from compress.methods.transfer.options import TransferOptions
from compress.methods.transfer.plan import DiffSource, TensorPlan, check_architectures, output_vocab_size, plan_tensors
from compress.methods.transfer.report import CompatibilityReport, TensorStats
from compress.methods.transfer.vocab import segments
from compress.progress import bar

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json")


class CheckpointDiff(DiffSource):
    """Δ read from a source base and its fine-tune; optionally replaced by its truncated SVD."""

    label = "source base"

    def __init__(self, base: Checkpoint, finetuned: Checkpoint, rank: int | None = None):
        self.base_ckpt, self.ft_ckpt, self.rank = base, finetuned, rank
        self._low_rank: tuple[str, LowRankDelta] | None = None

    def config(self) -> dict:
        return self.base_ckpt.config()

    def base_names(self):
        return list(self.base_ckpt.tensors)

    def finetuned_names(self):
        return list(self.ft_ckpt.tensors)

    def base_shape(self, name):
        return self.base_ckpt.info(name).shape

    def finetuned_shape(self, name):
        return self.ft_ckpt.info(name).shape

    def base(self, name, start, stop):
        return self.base_ckpt.read(name, start, stop).double()

    def finetuned(self, name, start, stop):
        return self.ft_ckpt.read(name, start, stop).double()

    def dense_delta(self, name, start, stop):
        delta = self.ft_ckpt.read(name, start, stop).double()
        delta -= self.base_ckpt.read(name, start, stop).double()
        return delta

    def low_rank(self, name) -> LowRankDelta:
        """The truncated SVD of the whole Δ over the rows both sources have (cached per tensor)."""
        if self._low_rank is None or self._low_rank[0] != name:
            self._low_rank = None  # free the previous tensor's factors first
            rows = min(self.base_shape(name)[0], self.finetuned_shape(name)[0])
            self._low_rank = (name, truncated_svd(self.dense_delta(name, 0, rows), self.rank))
        return self._low_rank[1]

    def delta(self, name, start, stop):
        if wants_low_rank(self.base_shape(name), self.rank):
            return self.low_rank(name).rows(start, stop)
        return self.dense_delta(name, start, stop)

    def delta_and_base(self, name, start, stop):
        base = self.base(name, start, stop)
        if wants_low_rank(self.base_shape(name), self.rank):
            return self.low_rank(name).rows(start, stop), base
        delta = self.ft_ckpt.read(name, start, stop).double()
        delta -= base
        return delta, base

    def kept_energy(self, name):
        if wants_low_rank(self.base_shape(name), self.rank):
            return self.low_rank(name).kept_energy
        return None


def row_blocks(shape: tuple[int, ...], block_bytes: int, start: int = 0, stop: int | None = None):
    """Consecutive ``(a, b)`` row ranges holding at most ``block_bytes`` of float64 each (≥ 1 row)."""
    stop = (shape[0] if shape else 1) if stop is None else stop
    row_elems = 1
    for d in shape[1:]:
        row_elems *= d
    step = max(1, block_bytes // (8 * max(1, row_elems)))
    for a in range(start, stop, step):
        yield a, min(stop, a + step)


def transferred_block(plan: TensorPlan, source: DiffSource, target: Checkpoint, scale: float, a: int, b: int,
                      stats: TensorStats) -> torch.Tensor:
    """Output rows ``a:b`` of one tensor in float64, accumulating the report's sums on the way."""
    info = target.info(plan.name)
    out = torch.empty((b - a, *info.row_shape), dtype=torch.float64)
    for kind, s, e in segments(plan.rows, a, b):
        if kind == "delta":
            theta = target.read(plan.name, s, e).double()
            delta, base = source.delta_and_base(plan.name, s, e)
            stats.add(base, theta, delta)
            out[s - a:e - a] = theta + scale * delta  # θ_target + λΔ, in float64
        elif kind == "finetuned":
            out[s - a:e - a] = source.finetuned(plan.name, s, e)  # added tokens: the fine-tuned rows
        else:
            out[s - a:e - a] = target.read(plan.name, s, e).double()
    return out.reshape((b - a, *info.row_shape) if info.shape else ())


def stream_transfer(source: DiffSource, target: Checkpoint, plans: list[TensorPlan], options: TransferOptions,
                    folder: Path | None) -> CompatibilityReport:
    """Write the output weights into ``folder`` (None: only compute the report)."""
    report = CompatibilityReport(warn_drift=options.warn_drift, warn_cosine=options.warn_cosine)
    writer = None
    if folder is not None:
        writer = ShardedWriter(folder, [(p.name, p.dtype, p.shape) for p in plans], options.max_shard_bytes)
    progress = bar("transfer", total=len(plans), unit="tensor")
    for plan in plans:
        if not plan.transfer:
            if writer is not None:
                for a, b in row_blocks(plan.shape, options.block_bytes):
                    writer.write(plan.name, target.read(plan.name, a, b))
        else:
            stats = TensorStats(plan.name)
            for a, b in row_blocks(plan.shape, options.block_bytes):
                block = transferred_block(plan, source, target, options.scale, a, b, stats)
                if writer is not None:
                    writer.write(plan.name, block.to(plan.dtype))
            stats.kept_energy = source.kept_energy(plan.name)
            report.tensors.append(stats)
        progress.update(1)
    progress.close()
    if writer is not None:
        writer.close()
    return report


def copy_support_files(out: Path, target_folder: Path, tokenizer_folder: Path, plans: list[TensorPlan]) -> None:
    """Config from the target base (its rope settings); tokenizer and chat template from the fine-tune."""
    config = json.loads((target_folder / "config.json").read_text())
    vocab_size = output_vocab_size(plans, config)
    if vocab_size is not None and config.get("vocab_size") != vocab_size:
        log.info("vocab_size %s -> %s", config.get("vocab_size"), vocab_size)
        config["vocab_size"] = vocab_size
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for name in TOKENIZER_FILES:
        if (tokenizer_folder / name).is_file():
            shutil.copyfile(tokenizer_folder / name, out / name)
    # generation_config carries the chat's end-of-turn ids: it goes with the chat template.
    for folder in (tokenizer_folder, target_folder):
        if (folder / "generation_config.json").is_file():
            shutil.copyfile(folder / "generation_config.json", out / "generation_config.json")
            break


def resolve_inputs(specs: dict[str, str]) -> dict[str, Path]:
    """Resolve each model argument (folder, GGUF file, alias) to a local safetensors folder."""
    from compress.models import resolve_model_path

    return {label: resolve_model_path(spec) for label, spec in specs.items()}


def check_not_an_input(out: str | os.PathLike, specs: dict[str, str]) -> None:
    """An output path equal to an input is an error (checked before any input is resolved)."""
    target = Path(out).expanduser().resolve()
    for label, spec in specs.items():
        path = Path(str(spec)).expanduser()
        if path.exists() and target == path.resolve():
            raise CompressError(f"--out {out} is the {label}: choose another folder, an input is never overwritten")


def transfer(source_base: str, source_ft: str, target_base: str, out: str | os.PathLike | None,
             options: TransferOptions | None = None, force: bool = False,
             on_report: Callable[[CompatibilityReport], None] | None = None) -> CompatibilityReport:
    """Add the diff (source_ft − source_base) to target_base and write the result to ``out``.

    The three models are the arguments (``options.source_base``/``source_ft`` are not read: they are
    the recipe method's inputs). ``out=None`` computes the compatibility report only and writes
    nothing. ``on_report`` is called with the report before the output is moved into place.
    """
    options = options or TransferOptions()
    options.check()
    specs = {"source base": source_base, "source fine-tuned model": source_ft, "target base": target_base}
    if out is not None:
        check_not_an_input(out, specs)
    folders = resolve_inputs(specs)
    if out is not None:
        check_output_path(out, [*specs.values(), *folders.values()], force)
    ckpts = {label: Checkpoint(folder, label) for label, folder in folders.items()}
    check_architectures({label: ckpt.config() for label, ckpt in ckpts.items()})
    source = CheckpointDiff(ckpts["source base"], ckpts["source fine-tuned model"], options.rank)
    target = ckpts["target base"]
    vocab = options.resolved_vocab(in_memory=False)
    plans = plan_tensors(source, target, options.include, options.exclude, vocab)
    if out is None:
        report = stream_transfer(source, target, plans, options, None)
        if on_report is not None:
            on_report(report)
        return report
    with atomic_output(out, [*specs.values(), *folders.values()], force) as tmp:
        report = stream_transfer(source, target, plans, options, tmp)
        for warning in report.warnings():
            log.warning(warning)
        if on_report is not None:
            on_report(report)
        copy_support_files(tmp, folders["target base"], folders["source fine-tuned model"], plans)
        write_record(tmp, {
            "method": "transfer",
            "source_model": {label: str(spec) for label, spec in specs.items()},
            "config": {"scale": options.scale, "include": options.include, "exclude": options.exclude,
                       "vocab": vocab, "rank": options.rank},
            "files": {"config": "target base", "tokenizer": "source fine-tuned model"},
            "vocab": {p.name: vars(p.rows) for p in plans if p.transfer and p.rows.out != p.rows.source},
            "report": report.as_dict(),
            **options.extra_record,
        })
    return report
