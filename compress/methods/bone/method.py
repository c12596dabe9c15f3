"""The registered adapter methods: ``bone``, ``bat`` and ``lora`` (whole-model, training)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from compress.errors import ConfigError
from compress.plugin import ModelMethod, RunContext, config_field, register
from compress.methods.bone.adapter import ALL_PROJECTIONS, attach_adapter, trainable_parameters


@dataclass
class AdapterConfig:
    r: int = config_field(64, "Block size (Bone/Bat) or rank (LoRA).")
    targets: list[str] = config_field(list(ALL_PROJECTIONS), "Names of the Linear modules to adapt.")
    layers: list[int] | None = config_field(None, "Decoder layer indices to adapt (default: all).")
    lora_alpha: float | None = config_field(None, "LoRA scale numerator (default 2r); ignored by Bone/Bat.")
    dropout: float = config_field(0.0, "Dropout on the adapter's input.")

    def __post_init__(self):
        if self.r < 1:
            raise ConfigError(f"field 'r' must be a positive integer, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"field 'dropout' must be in [0, 1), got {self.dropout}")
        if not self.targets:
            raise ConfigError("field 'targets' must name at least one module")


class AdapterMethod(ModelMethod):
    """Attach a peft adapter, train it with compress.train.loop, return the peft model and the losses.

    ``run`` reads from ``ctx.extras``: ``train_examples`` (required, a list of
    :class:`compress.train.data.Example`), and optionally ``eval_examples`` (default none),
    ``train_config`` (a :class:`compress.train.loop.TrainConfig`; default: its defaults with
    ``ctx.seed``), ``pad_id`` (default: the tokenizer's pad id, else 0), ``accelerator`` (default: one
    for ``ctx.device``), ``checkpoint_dir``, ``resume``, ``on_step`` and ``loss`` (see
    :func:`compress.train.loop.train`).
    """

    Config: ClassVar[type] = AdapterConfig
    output_format: ClassVar[str] = "peft"
    verb: ClassVar[str] = "adapt"
    requires: ClassVar[tuple[str, ...]] = ("train_examples",)  # from `compress adapt`, not from a recipe

    def attach(self, model, seed: int = 0):
        c = self.config
        return attach_adapter(model, self.name, c.r, c.targets, c.layers, c.lora_alpha, c.dropout, seed)

    def run(self, ctx: RunContext) -> dict:
        from compress.train.loop import TrainConfig, make_accelerator, train

        extras = ctx.extras
        if not extras.get("train_examples"):
            raise ConfigError(f"method {self.name} trains an adapter and needs training examples "
                              f"(ctx.extras['train_examples']): use compress adapt")
        train_config = extras.get("train_config") or TrainConfig(seed=ctx.seed)
        pad_id = extras.get("pad_id")
        if pad_id is None:
            pad_id = getattr(ctx.tokenizer, "pad_token_id", None)
            pad_id = 0 if pad_id is None else pad_id
        accelerator = extras.get("accelerator") or make_accelerator(
            train_config.grad_accum, "cpu" if torch.device(ctx.device).type == "cpu" else "auto")
        peft_model = self.attach(ctx.model, train_config.seed)
        result = train(peft_model, extras["train_examples"], extras.get("eval_examples") or [], train_config, pad_id,
                       accelerator=accelerator, checkpoint_dir=extras.get("checkpoint_dir"),
                       resume=extras.get("resume", False), on_step=extras.get("on_step"), loss=extras.get("loss"))
        return {"model": peft_model, "result": result, "trainable_parameters": trainable_parameters(peft_model)}


@register
class BoneMethod(AdapterMethod):
    name = "bone"
    help = "Bone block adapter, peft MiSS default form: one r x out block shared by all input blocks."


@register
class BatMethod(AdapterMethod):
    name = "bat"
    help = "Bone's weight-guided form (peft MiSS init_weights='bat'): ΔW_ab = W_ab B_a + B_a."


@register
class LoraMethod(AdapterMethod):
    name = "lora"
    help = "LoRA (peft), for comparison: ΔW = (alpha/r) B A."
