"""Bone / Bat block-affine adapters (and LoRA beside them), built on peft's MiSS and LoRA tuners."""

from compress.methods.bone.method import BatMethod, BoneMethod, LoraMethod  # noqa: F401  (registers them)
