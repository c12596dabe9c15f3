"""The one options type of fine-tuning transfer, with every default written once.

:class:`TransferOptions` is at the same time the registered method's ``Config`` (recipes and the
Python API build it with :func:`compress.config.make_config`), the options of the streamed
``transfer()`` / ``apply()`` / ``extract()`` functions, and the source of the ``compress transfer``
flags' defaults and help texts (compress/cli/transfer_cmd.py reads them from the fields).

The vocabulary policy is the one default that depends on where the result goes: a checkpoint can
grow rows for added tokens, a model in memory cannot. ``vocab`` therefore defaults to ``None``,
meaning "the default of the destination", and :meth:`TransferOptions.resolved_vocab` turns it into
``pad`` (a checkpoint: ``compress transfer``/``apply``, ``transfer()``) or ``error`` (the in-memory
recipe method), as before the types were merged.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

from compress.config import config_field
from compress.errors import ConfigError
from compress.methods.transfer.report import WARN_COSINE, WARN_DRIFT
from compress.methods.transfer.vocab import VOCAB_DEFAULT_CHECKPOINT, VOCAB_DEFAULT_IN_MEMORY, VOCAB_POLICIES

# Fields only a written checkpoint uses; the in-memory method rejects them when they are changed.
CHECKPOINT_ONLY = ("max_shard_bytes", "extra_record")


@dataclass
class TransferOptions:
    """Options of a fine-tuning transfer θ_target + λ·(θ_ft − θ_base) (see the module docstring)."""

    source_base: str = config_field("", "Base model of the source version (folder, GGUF or alias).")
    source_ft: str = config_field("", "Fine-tuned model of the source version.")
    scale: float = config_field(1.0, "λ: the output is target + λ·(fine-tuned − base).")
    include: str | None = config_field(None, "Regex: only tensors whose name matches get the diff.")
    exclude: str | None = config_field(None, "Regex: tensors whose name matches are copied from the target "
                                             "unchanged.")
    vocab: Literal["pad", "truncate", "error"] | None = config_field(
        None, "Embedding/lm_head rows that differ: pad with the fine-tuned rows, truncate to the smallest, or "
              "stop with an error. Default: pad when a checkpoint is written, error for a model in memory "
              "(a recipe stage), which cannot grow rows.")
    rank: int | None = config_field(None, "Keep a rank-K truncated SVD of each matrix's diff.")
    block_bytes: int = config_field(32 * 2**20, "Float64 bytes per operand block read at once.")
    max_shard_bytes: int = config_field(5 * 10**9, "Largest output safetensors shard (checkpoints only).")
    warn_drift: float = config_field(WARN_DRIFT, "Warn when the median ‖target − base‖/‖base‖ is above this.")
    warn_cosine: float = config_field(WARN_COSINE, "Warn when the median cosine(target, base) is below this.")
    extra_record: dict = config_field({}, "Extra keys for the output's compress.json (checkpoints only).")

    def resolved_vocab(self, in_memory: bool) -> str:
        """The vocabulary policy: the one given, else the destination's default."""
        if self.vocab is not None:
            return self.vocab
        return VOCAB_DEFAULT_IN_MEMORY if in_memory else VOCAB_DEFAULT_CHECKPOINT

    def check(self, method: str | None = None) -> None:
        """Raise a ConfigError for a bad value. Messages name the CLI flag (``--rank must be ...``), or,
        with ``method``, the recipe field (``method transfer: field 'rank' must be ...``); a method also
        needs both source models and keeps the checkpoint-only fields at their defaults."""
        def name(field: str) -> str:
            return f"{method}: field '{field}'" if method else f"--{field.replace('_', '-')}"

        if method and (not self.source_base or not self.source_ft):
            raise ConfigError(f"{method}: fields 'source_base' and 'source_ft' are required")
        if self.rank is not None and self.rank <= 0:
            raise ConfigError(f"{name('rank')} must be a positive integer, got {self.rank}")
        if not math.isfinite(self.scale):
            raise ConfigError(f"{name('scale')} must be a finite number, got {self.scale}")
        if self.vocab is not None and self.vocab not in VOCAB_POLICIES:
            raise ConfigError(f"{name('vocab')} must be one of {', '.join(VOCAB_POLICIES)}, got {self.vocab!r}")
        if self.block_bytes < 1 or self.max_shard_bytes < 1:
            raise ConfigError(f"{name('block_bytes' if self.block_bytes < 1 else 'max_shard_bytes')} "
                              f"must be at least 1")
        if method:
            defaults = TransferOptions()
            for field in CHECKPOINT_ONLY:
                if getattr(self, field) != getattr(defaults, field):
                    raise ConfigError(f"{name(field)} only applies when a checkpoint is written "
                                      f"(compress transfer); a model in memory has no shards or record")

    def replace(self, **changes) -> "TransferOptions":
        """A copy with ``changes`` (unknown names are a TypeError, as for the constructor)."""
        return dataclasses.replace(self, **changes)


def default(name: str):
    """The default of field ``name`` (what the CLI shows)."""
    found = {f.name: f for f in dataclasses.fields(TransferOptions)}[name]
    return found.default if found.default is not dataclasses.MISSING else found.default_factory()


def help_text(name: str) -> str:
    return {f.name: f for f in dataclasses.fields(TransferOptions)}[name].metadata["help"]
