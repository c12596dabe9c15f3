"""A diff vector as a small artifact: ``compress transfer extract`` writes it, ``apply`` adds it.

Layout of the artifact folder:

- ``diff.safetensors``: per tensor either ``NAME:u`` (m, K) and ``NAME:v`` (K, n), the truncated SVD
  Δ ≈ u @ v of a matrix (with ``--rank K``), or ``NAME:delta``, Δ itself (vectors, or no rank); plus
  ``NAME:added`` for the rows of added tokens (the fine-tuned rows the source base lacks).
- ``diff.json``: the format, the source models, the rank and dtype, the source base's shape-defining
  config fields, and per tensor its source shape, fine-tuned row count and kept energy.
- the fine-tuned model's tokenizer and chat template, which ``apply`` ships with its output.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable

import torch

from compress.errors import CompressError
from compress.export import atomic_output, check_output_path, write_record
from compress.methods.transfer.checkpoint import Checkpoint, ShardedWriter
from compress.methods.transfer.lowrank import LowRankDelta, wants_low_rank
from compress.methods.transfer.options import TransferOptions
from compress.methods.transfer.plan import ARCH_FIELDS, DiffSource, check_architectures, plan_tensors
from compress.methods.transfer.report import CompatibilityReport
from compress.methods.transfer.streaming import (TOKENIZER_FILES, CheckpointDiff, check_not_an_input,
                                                 copy_support_files, resolve_inputs, row_blocks, stream_transfer)
from compress.methods.transfer.vocab import VOCAB_DEFAULT_CHECKPOINT
from compress.progress import bar

DIFF_FORMAT = "compress-diff"
DIFF_VERSION = 1
ARTIFACT_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
                   "float16": torch.float16}


def _artifact_entries(source: CheckpointDiff, names: list[str], rank: int | None, dtype: torch.dtype):
    """(stored name, dtype, shape) of every tensor the artifact holds, and per-tensor metadata."""
    entries, meta = [], {}
    for name in names:
        base, ft = source.base_shape(name), source.finetuned_shape(name)
        rows = min(base[0], ft[0]) if base else 1
        low = wants_low_rank(base, rank)
        if low:
            k = min(rank, rows, base[1])
            entries += [(f"{name}:u", dtype, (rows, k)), (f"{name}:v", dtype, (k, base[1]))]
        else:
            entries.append((f"{name}:delta", dtype, (rows, *base[1:]) if base else ()))
        if base and ft[0] > base[0]:
            entries.append((f"{name}:added", dtype, (ft[0] - base[0], *ft[1:])))
        meta[name] = {"shape": list(base), "finetuned_rows": ft[0] if ft else 1, "low_rank": low}
    return entries, meta


def extract(source_base: str, source_ft: str, out: str | os.PathLike, options: TransferOptions | None = None,
            dtype: str = "float32", force: bool = False, **changes) -> dict:
    """Write the diff source_ft − source_base (as rank-``rank`` factors with ``rank``) to ``out``.

    ``options`` (or TransferOptions' defaults) with ``changes`` (``rank=64``, ``include=...``) applied;
    extract reads ``rank``, ``include``, ``exclude`` and ``block_bytes``.
    """
    options = (options or TransferOptions()).replace(**changes)
    options.check()
    rank, include, exclude, block_bytes = options.rank, options.include, options.exclude, options.block_bytes
    if dtype not in ARTIFACT_DTYPES:
        raise CompressError(f"--dtype must be one of {', '.join(ARTIFACT_DTYPES)}, got {dtype!r}")
    specs = {"source base": source_base, "source fine-tuned model": source_ft}
    check_not_an_input(out, specs)
    folders = resolve_inputs(specs)
    check_output_path(out, [*specs.values(), *folders.values()], force)
    base, ft = (Checkpoint(folders[label], label) for label in specs)
    check_architectures({"source base": base.config(), "source fine-tuned model": ft.config()})
    source = CheckpointDiff(base, ft, rank)
    # The source base stands in for the target: this checks names and shapes with the same rules.
    plans = plan_tensors(source, base, include, exclude, vocab=VOCAB_DEFAULT_CHECKPOINT)
    names = [p.name for p in plans if p.transfer]
    store = ARTIFACT_DTYPES[dtype]
    entries, meta = _artifact_entries(source, names, rank, store)
    config = base.config()
    with atomic_output(out, [*specs.values(), *folders.values()], force) as tmp:
        writer = ShardedWriter(tmp, entries, max_shard_bytes=10**12, prefix="diff")
        progress = bar("extract", total=len(names), unit="tensor")
        for name in names:
            shape = source.base_shape(name)
            if meta[name]["low_rank"]:
                low: LowRankDelta = source.low_rank(name)
                writer.write(f"{name}:u", low.u.to(store))
                writer.write(f"{name}:v", low.v.to(store))
                meta[name].update(kept_energy=low.kept_energy, energy=low.energy, rank=low.rank)
            else:
                rows = min(shape[0], source.finetuned_shape(name)[0]) if shape else 1
                energy = 0.0
                for a, b in row_blocks(shape, block_bytes, 0, rows):
                    delta = source.dense_delta(name, a, b)
                    energy += float(delta.square().sum())
                    writer.write(f"{name}:delta", delta.to(store))
                meta[name].update(energy=energy)
            ft_rows = meta[name]["finetuned_rows"]
            if shape and ft_rows > shape[0]:
                writer.write(f"{name}:added", source.finetuned(name, shape[0], ft_rows).to(store))
            progress.update(1)
        progress.close()
        writer.close()
        for file in TOKENIZER_FILES + ("generation_config.json",):
            if (folders["source fine-tuned model"] / file).is_file():
                shutil.copyfile(folders["source fine-tuned model"] / file, tmp / file)
        description = {"format": DIFF_FORMAT, "version": DIFF_VERSION, "rank": rank, "dtype": dtype,
                       "source_base": str(source_base), "source_finetuned": str(source_ft),
                       "config": {k: config[k] for k in ARCH_FIELDS if k in config}, "tensors": meta}
        (tmp / "diff.json").write_text(json.dumps(description, indent=1) + "\n")
        write_record(tmp, {"method": "transfer-extract", "source_model": specs,
                           "config": {"rank": rank, "dtype": dtype, "include": include, "exclude": exclude}})
    return description


class ArtifactDiff(DiffSource):
    """Δ read back from an extracted artifact."""

    label = "diff artifact"

    def __init__(self, folder: Path):
        path = folder / "diff.json"
        if not path.is_file():
            raise CompressError(f"{folder} is not a diff artifact (no diff.json); make one with compress transfer extract")
        self.description = json.loads(path.read_text())
        if self.description.get("format") != DIFF_FORMAT:
            raise CompressError(f"{path} is not a {DIFF_FORMAT} description")
        self.meta = self.description["tensors"]
        self.store = Checkpoint(folder, "diff artifact")
        self._factors: tuple[str, LowRankDelta] | None = None

    def config(self):
        return self.description["config"]

    def base_names(self):
        return list(self.meta)

    finetuned_names = base_names

    def base_shape(self, name):
        return tuple(self.meta[name]["shape"])

    def finetuned_shape(self, name):
        shape = self.base_shape(name)
        return (self.meta[name]["finetuned_rows"], *shape[1:]) if shape else ()

    def delta(self, name, start, stop):
        if self.meta[name]["low_rank"]:
            if self._factors is None or self._factors[0] != name:
                u, v = self.store.read(f"{name}:u"), self.store.read(f"{name}:v")
                self._factors = (name, LowRankDelta(u, v, 0.0, 0.0))
            return self._factors[1].rows(start, stop)
        return self.store.read(f"{name}:delta", start, stop).double()

    def finetuned(self, name, start, stop):
        first = self.meta[name]["shape"][0]
        if start < first:
            raise CompressError(f"{name}: the target base has fewer vocabulary rows than the diff's source base; "
                                f"the fine-tuned rows are not in the artifact: use --vocab truncate")
        return self.store.read(f"{name}:added", start - first, stop - first).double()

    def kept_energy(self, name):
        return self.meta[name].get("kept_energy")


def apply(diff: str | os.PathLike, target_base: str, out: str | os.PathLike, options: TransferOptions | None = None,
          force: bool = False, on_report: Callable[[CompatibilityReport], None] | None = None,
          **changes) -> CompatibilityReport:
    """Add λ·Δ from an artifact to ``target_base`` and write the result to ``out``.

    ``options`` (or TransferOptions' defaults) with ``changes`` (``scale=0.5``, ``vocab="truncate"``)
    applied; the artifact's rank is the one it was extracted with.
    """
    options = (options or TransferOptions()).replace(**changes)
    options.check()
    scale, include, exclude = options.scale, options.include, options.exclude
    vocab = options.resolved_vocab(in_memory=False)
    specs = {"diff artifact": str(diff), "target base": target_base}
    check_not_an_input(out, specs)
    source = ArtifactDiff(Path(diff).expanduser())
    folders = resolve_inputs({"target base": target_base})
    check_output_path(out, [*specs.values(), folders["target base"]], force)
    target = Checkpoint(folders["target base"], "target base")
    check_architectures({"diff's source base": source.config(), "target base": target.config()})
    plans = plan_tensors(source, target, include, exclude, vocab)
    for plan in plans:  # an artifact holds only the fine-tuned rows its source base lacks
        if plan.transfer and plan.rows.common < min(plan.rows.source, plan.rows.finetuned, plan.rows.out):
            raise CompressError(f"{plan.name}: the target base has fewer vocabulary rows ({plan.rows.target}) than "
                                f"the diff's source base ({plan.rows.source}), and the artifact lacks the fine-tuned "
                                f"rows between: use --vocab truncate")
    with atomic_output(out, [*specs.values(), folders["target base"]], force) as tmp:
        report = stream_transfer(source, target, plans, options, tmp)
        if on_report is not None:
            on_report(report)
        copy_support_files(tmp, folders["target base"], Path(diff).expanduser(), plans)
        write_record(tmp, {"method": "transfer-apply", "source_model": specs,
                           "config": {"scale": scale, "include": include, "exclude": exclude, "vocab": vocab,
                                      "rank": source.description.get("rank")},
                           "report": report.as_dict()})
    return report

