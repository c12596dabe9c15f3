"""Vocabulary rows of the embedding and output matrices when the three models' vocabularies differ.

A fine-tune often adds tokens (chat markers), and model versions can pad their vocabularies
differently. Only the row count of ``embed_tokens``/``lm_head`` may differ; the policies:

- ``pad`` (default): the output has ``max(target rows, fine-tuned rows)`` rows. Rows that all three
  models have get ``target + λ·Δ``; rows the fine-tuned model has but a base lacks (added tokens)
  are the fine-tuned rows themselves ("padded rows equal the fine-tuned rows"); rows only the
  target has are kept as they are (the fine-tuned tokenizer never emits them).
- ``truncate``: every matrix is cut to the smallest of the three row counts.
- ``error``: any difference in row count is an error naming the tensor.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from compress.errors import CompressError

VOCAB_POLICIES = ("pad", "truncate", "error")
VOCAB_DEFAULT_CHECKPOINT = "pad"  # a written checkpoint gets the rows of added tokens
VOCAB_DEFAULT_IN_MEMORY = "error"  # a model in memory cannot grow rows
VOCAB_TENSOR = re.compile(r"(^|\.)(embed_tokens|lm_head|wte|embed_in|embed_out)\.weight$")


def is_vocab_tensor(name: str) -> bool:
    return bool(VOCAB_TENSOR.search(name))


@dataclass(frozen=True)
class VocabRows:
    """Row counts of one vocabulary matrix in the source base, the fine-tuned model and the target.

    ``out`` is the number of rows written. Row ``r`` of the output is, with ``common`` =
    min(source, finetuned, target): ``target + λ·Δ`` for ``r < common``; the fine-tuned row for
    ``common <= r < finetuned``; the target row for ``finetuned <= r < target``.
    """

    source: int
    finetuned: int
    target: int
    out: int

    @property
    def common(self) -> int:
        return min(self.source, self.finetuned, self.target, self.out)

    @property
    def padded(self) -> int:
        """How many output rows are copied from the fine-tuned model."""
        return max(0, min(self.finetuned, self.out) - self.common)


def resolve_rows(name: str, source: int, finetuned: int, target: int, policy: str) -> VocabRows:
    """Apply the vocabulary policy to one matrix's row counts."""
    if policy not in VOCAB_POLICIES:
        raise CompressError(f"--vocab must be one of {', '.join(VOCAB_POLICIES)}, got {policy!r}")
    if source == finetuned == target:
        return VocabRows(source, finetuned, target, target)
    if policy == "error":
        raise CompressError(f"vocabulary mismatch in {name}: {source} rows in the source base, {finetuned} in "
                            f"the source fine-tuned model, {target} in the target base "
                            f"(use --vocab pad or --vocab truncate, or --exclude it)")
    if policy == "truncate":
        return VocabRows(source, finetuned, target, min(source, finetuned, target))
    return VocabRows(source, finetuned, target, max(target, finetuned))


def segments(rows: VocabRows, start: int, stop: int) -> list[tuple[str, int, int]]:
    """Split output rows ``start:stop`` into runs of ``("delta"|"finetuned"|"target", a, b)``."""
    bounds = [("delta", 0, rows.common), ("finetuned", rows.common, max(rows.common, rows.finetuned)),
              ("target", max(rows.common, rows.finetuned), rows.out)]
    out = []
    for kind, a, b in bounds:
        a, b = max(a, start), min(b, stop)
        if a < b:
            out.append((kind, a, b))
    return out
