"""What a transfer will do, decided from headers and configs alone before any tensor is read.

Every check a user can trip (architectures that differ, a missing tensor, a shape mismatch, a
vocabulary mismatch under ``--vocab error``, a bad regular expression) fails here, so a bad input
costs no reading and writes nothing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from compress.errors import CompressError
from compress.methods.transfer.checkpoint import FLOAT_DTYPES, Checkpoint
from compress.methods.transfer.vocab import VOCAB_DEFAULT_CHECKPOINT, VocabRows, is_vocab_tensor, resolve_rows

# Config fields that fix the tensor shapes and their meaning; rope settings and the vocabulary size
# are deliberately absent (a new version may change them: the output keeps the target's).
ARCH_FIELDS = ("model_type", "architectures", "hidden_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "intermediate_size", "head_dim")


class DiffSource:
    """Where Δ comes from: two checkpoints (a source base and its fine-tune) or a diff artifact."""

    label = "source"

    def config(self) -> dict:
        raise NotImplementedError

    def base_names(self) -> list[str]:
        raise NotImplementedError

    def finetuned_names(self) -> list[str]:
        raise NotImplementedError

    def base_shape(self, name: str) -> tuple[int, ...]:
        raise NotImplementedError

    def finetuned_shape(self, name: str) -> tuple[int, ...]:
        raise NotImplementedError

    def delta(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of Δ = θ_ft − θ_base in float64 (rows both sources have)."""
        raise NotImplementedError

    def base(self, name: str, start: int, stop: int) -> torch.Tensor | None:
        """Rows of the source base in float64, or None where not known (a diff artifact)."""
        return None

    def delta_and_base(self, name: str, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Δ and the source base for the same rows (sources that read the base once override this)."""
        return self.delta(name, start, stop), self.base(name, start, stop)

    def finetuned(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows of the fine-tuned model in float64 (at least the rows the source base lacks)."""
        raise NotImplementedError

    def kept_energy(self, name: str) -> float | None:
        return None


@dataclass
class TensorPlan:
    """One output tensor: copied from the target, or target + λ·Δ over ``rows``."""

    name: str
    dtype: torch.dtype  # the target's
    shape: tuple[int, ...]  # output shape
    transfer: bool
    rows: VocabRows | None = None


def check_architectures(configs: dict[str, dict]) -> None:
    """Raise when the models' shape-defining config fields differ, naming the field and the models."""
    labels = list(configs)
    first = labels[0]
    for field in ARCH_FIELDS:
        values = {label: configs[label].get(field) for label in labels}
        for label in labels[1:]:
            a, b = values[first], values[label]
            if a is None or b is None:
                continue
            if a != b:
                raise CompressError(f"architectures differ: {field} is {a} in the {first} but {b} in the {label}; "
                                    f"the diff of one architecture cannot be added to another")


def compile_pattern(pattern: str | None, option: str) -> re.Pattern | None:
    if pattern is None or pattern == "":
        return None
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise CompressError(f"{option}: invalid regular expression {pattern!r}: {exc}") from None


def plan_tensors(source: DiffSource, target: Checkpoint, include: str | None = None, exclude: str | None = None,
                 vocab: str = VOCAB_DEFAULT_CHECKPOINT) -> list[TensorPlan]:
    """The output tensors in the target's order, with every shape and name check done."""
    include_re, exclude_re = compile_pattern(include, "--include"), compile_pattern(exclude, "--exclude")

    def selected(name: str) -> bool:
        return (include_re is None or include_re.search(name) is not None) and \
            (exclude_re is None or exclude_re.search(name) is None)

    base_names, ft_names = set(source.base_names()), set(source.finetuned_names())
    for name in sorted(base_names ^ ft_names):
        if selected(name):
            where = "source fine-tuned model" if name in base_names else "source base"
            raise CompressError(f"missing tensor {name} in the {where}; --exclude it to leave it out")
    for name in sorted(base_names - set(target.tensors)):
        if selected(name):
            raise CompressError(f"missing tensor {name} in the target base (the source has it); "
                                f"--exclude it to leave it out")
    plans = []
    for name, info in target.tensors.items():
        if not selected(name) or info.dtype not in FLOAT_DTYPES:
            plans.append(TensorPlan(name, info.dtype, info.shape, transfer=False))
            continue
        if name not in base_names:
            raise CompressError(f"missing tensor {name} in the {source.label} (the target base has it); "
                                f"--exclude it to copy it unchanged")
        plans.append(_plan_one(name, source.base_shape(name), source.finetuned_shape(name), info, vocab))
    return plans


def _plan_one(name: str, base: tuple, finetuned: tuple, info, vocab: str) -> TensorPlan:
    target = info.shape
    if base == finetuned == target:
        n = target[0] if target else 1
        return TensorPlan(name, info.dtype, target, True, VocabRows(n, n, n, n))
    same_rows = len(base) == len(finetuned) == len(target) == 2 and base[1] == finetuned[1] == target[1]
    if is_vocab_tensor(name) and same_rows:
        rows = resolve_rows(name, base[0], finetuned[0], target[0], vocab)
        return TensorPlan(name, info.dtype, (rows.out, target[1]), True, rows)
    raise CompressError(f"shape mismatch in {name}: {list(base)} in the source base, {list(finetuned)} in the "
                        f"source fine-tuned model, {list(target)} in the target base; --exclude it to copy "
                        f"the target's unchanged")


def output_vocab_size(plans: list[TensorPlan], config: dict) -> int | None:
    """The vocabulary size the output config must declare (the embedding's row count)."""
    for plan in plans:
        if is_vocab_tensor(plan.name) and "embed" in plan.name:
            return plan.shape[0]
    return config.get("vocab_size")
