"""The settings of a Zebra-Llama distillation: the ``zebra-distill`` method's Config and the flags of
``compress distill`` (one dataclass, so the CLI and a recipe stage say the same things).

Checks that need no model are here (``__post_init__``: a ConfigError naming the setting); the ones
that need the teacher and the data are in :mod:`compress.distill.plan`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from compress.config import config_field
from compress.errors import ConfigError


@dataclass
class DistillConfig:
    mla_layers: str | list = config_field("auto", "Layers that become MLA (the rest Mamba2): 'auto' (SMART, "
                                                  "--n-mla of them) or indices such as 0,5,10,14.")
    n_mla: int | None = config_field(None, "Number of MLA layers SMART chooses (default about 13% of the layers, "
                                           "at least 1).")
    q_rank: int | None = config_field(None, "MLA query rank r_q (default ⅔ of min(heads·head_dim, hidden), a "
                                            "multiple of 32).")
    kv_rank: int | None = config_field(None, "MLA latent rank r_kv (default min(128, 2·kv_heads·head_dim, hidden)).")
    rope_dim: int | None = config_field(None, "MLA RoPE dims d_rope (default head_dim/2).")
    data: str = config_field("wikitext2", "Training text (wikitext2, c4 or a text/JSON-lines file or folder), cut "
                                          "into disjoint --seqlen windows for ILD, SMART and KD.")
    seqlen: int = config_field(512, "Tokens per training window.")
    ild_tokens: int = config_field(32768, "Tokens each layer's mixers are distilled on (cached in the walk).")
    ild_epochs: int = config_field(1, "Passes over the ILD tokens per mixer.")
    ild_lr: float = config_field(1e-3, "Peak learning rate of ILD (AdamW, warm-up then cosine).")
    ild_batch_size: int | None = config_field(None, "Windows per ILD step (default --batch-size).")
    smart_tokens: int = config_field(4096, "Held-out tokens SMART measures the KL on (also KD's evaluation set).")
    kd_tokens: int = config_field(131072, "Tokens of end-to-end KD (0: no KD).")
    kd_teacher: str | None = config_field(None, "Teacher of KD (default: the distilled model), e.g. a larger model "
                                                "with the same tokenizer.")
    batch_size: int = config_field(8, "Windows per batch (per process in KD).")
    grad_accum: int = config_field(1, "Micro-batches per KD optimizer step.")
    lr: float = config_field(1e-4, "Peak learning rate of KD (AdamW).")
    warmup_steps: int = config_field(0, "KD linear learning-rate warm-up steps.")
    save_every: int = config_field(10, "KD checkpoint every N steps (0: none; --resume then restarts KD).")
    seed: int = config_field(0, "Seed of the windows, the fresh Mamba2 parameters and the data order.")
    state_dir: str | None = config_field(None, "Resume state folder (default: <out>.partial).")

    def __post_init__(self):
        for name in ("seqlen", "ild_tokens", "ild_epochs", "smart_tokens", "batch_size", "grad_accum"):
            _positive_int(self, name)
        for name in ("kd_tokens", "warmup_steps", "save_every"):
            _positive_int(self, name, zero=True)
        if self.seqlen < 2:
            raise ConfigError(f"seqlen must be at least 2 tokens, got {self.seqlen}")
        for name in ("ild_tokens", "smart_tokens"):
            if getattr(self, name) < self.seqlen:
                raise ConfigError(f"{_flag(name)} must be at least one window (--seqlen {self.seqlen}), got "
                                  f"{getattr(self, name)}")
        for name in ("ild_lr", "lr"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 \
                    or not math.isfinite(value):
                raise ConfigError(f"{_flag(name)} must be a positive number, got {value!r}")
        for name in ("n_mla", "ild_batch_size"):
            if getattr(self, name) is not None:
                _positive_int(self, name)
        if isinstance(self.mla_layers, str) and not self.mla_layers.strip():
            raise ConfigError("--mla-layers must be 'auto' or layer indices, got ''")

    @property
    def auto(self) -> bool:
        return isinstance(self.mla_layers, str) and self.mla_layers.strip() == "auto"


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _positive_int(config, name: str, zero: bool = False) -> None:
    value = getattr(config, name)
    low = 0 if zero else 1
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{_flag(name)} must be an integer ≥ {low}, got {value!r}")
