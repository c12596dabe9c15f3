"""Building a peft adapter on a LLaMA-like model: Bone (MiSS), Bat, or LoRA.

Bone (arXiv 2409.15371) splits each weight W (out x in) into r x r blocks and trains a block matrix.
peft ships it as MiSS (peft >= 0.17; its Bone tuner was removed in 0.19):

- ``bone``: ``MissConfig(init_weights=True)``, the Bone-equivalent default form. One trainable
  matrix B (r x out), zero-initialised, shared by every input block: ΔW[:, b*r:(b+1)*r] = Bᵀ for each
  input block b, i.e. y = W x + Bᵀ Σ_b x_b. When r does not divide in_features, peft pads x with
  zeros, so the last, narrower input block uses the first (in mod r) rows of B (documented handling).
- ``bat``: ``MissConfig(init_weights="bat")``, the paper's "Weight Guide" form: one r x r matrix B_a
  per output block a (out/r x r x r), zero-initialised, and ΔW_{a,b} = W_{a,b} B_a + B_a. It needs r
  to divide both in_features and out_features of every targeted module; anything else is an error.
- ``lora``: ``LoraConfig`` (ΔW = (alpha/r) B A), for comparison at an equal parameter budget.

Known peft issue: up to peft 0.21.x a MissLinear keeps one ``miss_fn`` for all its adapters, so a
second MiSS adapter with another ``init_weights`` (Bone next to Bat) silently switches the first one's
forward/merge (fixed by huggingface/peft#3379, 2026-07). We attach exactly one adapter per model, and
tests/test_adapt_formulas.py checks the installed peft's Bone and Bat forward and merge against the
formulas, so a regression there fails the tests.
"""

from __future__ import annotations

import logging
import math
import warnings
from contextlib import contextmanager

import torch

from compress.arch import SHORT_NAMES, layer_index
from compress.errors import CompressError

log = logging.getLogger(__name__)
ADAPTER_METHODS = ("bone", "bat", "lora")
ALL_PROJECTIONS = SHORT_NAMES  # q_proj … down_proj, as peft's target_modules name them


def targeted_linears(model: torch.nn.Module, targets: tuple[str, ...] | list[str],
                     layers: list[int] | None = None) -> dict[str, torch.nn.Linear]:
    """The Linear modules whose name ends with one of ``targets`` (in the chosen decoder layers)."""
    found = {}
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or name.split(".")[-1] not in targets:
            continue
        if layers is not None and layer_index(name) not in layers:
            continue
        found[name] = module
    if not found:
        raise CompressError(f"no Linear module named {', '.join(targets)} in the model")
    return found


def check_rank(method: str, r: int, modules: dict[str, torch.nn.Linear]) -> None:
    """Raise a CompressError a user can act on when ``r`` does not fit the targeted widths."""
    if method not in ADAPTER_METHODS:
        raise CompressError(f"unknown adapter method '{method}' (choose {', '.join(ADAPTER_METHODS)})")
    if r < 1:
        raise CompressError(f"--r must be a positive integer, got {r}")
    for name, linear in modules.items():
        n_in, n_out = linear.in_features, linear.out_features
        if method == "bone" and r > n_in:
            raise CompressError(f"--r {r} is larger than the input width {n_in} of {name}; "
                                f"Bone blocks are r wide, choose r <= {n_in}")
        if method == "bat" and (r > min(n_in, n_out) or n_in % r or n_out % r):
            common = math.gcd(*[w for m in modules.values() for w in (m.in_features, m.out_features)])
            raise CompressError(f"--r {r} does not divide {name} ({n_out} x {n_in}) into r x r blocks; Bat "
                                f"needs r to divide every targeted width (divisors of {common} fit)")
        if method == "lora" and r > min(n_in, n_out):
            raise CompressError(f"--r {r} is larger than the width of {name} ({n_out} x {n_in}); "
                                f"choose r <= {min(n_in, n_out)}")
    if method == "bone":
        ragged = sorted({m.in_features for m in modules.values() if m.in_features % r})
        if ragged:
            log.info("r=%d does not divide input widths %s: peft pads the last input block with zeros", r, ragged)


def peft_config(method: str, r: int, targets, layers: list[int] | None = None, lora_alpha: float | None = None,
                dropout: float = 0.0):
    """The peft config of ``method`` (see the module docstring)."""
    from peft import LoraConfig, MissConfig, TaskType

    common = dict(r=r, target_modules=list(targets), task_type=TaskType.CAUSAL_LM,
                  layers_to_transform=layers, layers_pattern="layers" if layers is not None else None)
    if method == "lora":
        return LoraConfig(lora_alpha=lora_alpha if lora_alpha is not None else 2 * r, lora_dropout=dropout,
                          **common)
    return MissConfig(init_weights="bat" if method == "bat" else True, miss_dropout=dropout, **common)


def attach_adapter(model: torch.nn.Module, method: str, r: int, targets=ALL_PROJECTIONS,
                   layers: list[int] | None = None, lora_alpha: float | None = None, dropout: float = 0.0,
                   seed: int = 0):
    """Wrap ``model`` in a peft model with a fresh adapter; only the adapter is trainable."""
    from peft import get_peft_model

    check_rank(method, r, targeted_linears(model, targets, layers))
    torch.manual_seed(seed)  # LoRA's A is random; Bone/Bat start at zero
    with quiet_peft():
        return get_peft_model(model, peft_config(method, r, targets, layers, lora_alpha, dropout))


@contextmanager
def quiet_peft():
    """peft (0.18) reads ``model.is_gradient_checkpointing``, a property transformers 5 deprecated with a
    FutureWarning on every read; the warning is about peft's call, not the user's: hidden here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def trainable_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def adapter_parameters(method: str, r: int, modules: dict[str, torch.nn.Linear]) -> int:
    """Trainable parameters of ``method`` at rank ``r``, from the widths alone (for budget matching).

    Bone: r x out per module; Bat: (out/r) blocks of r x r = r x out as well; LoRA: r x (in + out).
    """
    if method == "lora":
        return sum(r * (m.in_features + m.out_features) for m in modules.values())
    return sum(r * m.out_features for m in modules.values())
