"""The registered adapter methods: ``bone``, ``bat`` and ``lora`` (whole-model, training)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from compress.errors import ConfigError
from compress.methods.base import ModelMethod, config_field, register
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
    """Attach a peft adapter, train it with compress.train.loop, return the peft model and the losses."""

    Config: ClassVar[type] = AdapterConfig

    def attach(self, model, seed: int = 0):
        c = self.config
        return attach_adapter(model, self.name, c.r, c.targets, c.layers, c.lora_alpha, c.dropout, seed)

    def run(self, model, *, train_examples, eval_examples, train_config, pad_id, accelerator=None,
            checkpoint_dir=None, resume=False, on_step=None, **_) -> dict:
        from compress.train.loop import train

        peft_model = self.attach(model, train_config.seed)
        result = train(peft_model, train_examples, eval_examples, train_config, pad_id, accelerator=accelerator,
                       checkpoint_dir=checkpoint_dir, resume=resume, on_step=on_step)
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
