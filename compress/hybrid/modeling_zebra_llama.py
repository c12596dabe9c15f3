"""Zebra-Llama: a Llama whose decoder layers each mix tokens with attention, MLA or Mamba2.

Every decoder layer is the stock ``LlamaDecoderLayer`` (norms, MLP, residuals) whose ``self_attn`` is
the mixer ``config.layer_types[i]`` names: :class:`HybridAttention` (the parent's attention),
:class:`MLAttention` or :class:`Mamba2Mixer`. All take the attention's call and return ``(output,
None)``, so a layer-wise tool that drives Llama layers drives these too, and :func:`build_mixer`
makes one layer's mixer on its own (what a per-layer distillation trains).

The model builds its own :class:`HybridCache` on the first forward with ``use_cache=True`` (MLA
latents, kept-attention keys/values, Mamba2 conv and SSM states), so ``generate`` works and prefill
followed by token-by-token decode gives the logits of one full forward.

Self-contained (imports only torch, transformers and its sibling files): saved beside a hybrid
checkpoint with ``auto_map`` so that ``from_pretrained(..., trust_remote_code=True)`` reloads it;
:func:`register_auto_classes` lets a program that imports it load such folders without remote code.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.models.llama.modeling_llama import (
    LlamaDecoderLayer, LlamaForCausalLM, LlamaModel, LlamaPreTrainedModel, LlamaRMSNorm, LlamaRotaryEmbedding,
)

from .configuration_zebra_llama import ZebraLlamaConfig
from .zebra_attention import HybridAttention, MLAttention
from .zebra_cache import HybridCache
from .zebra_mamba2 import Mamba2Mixer

MIXER_CLASSES = {"attention": HybridAttention, "mla": MLAttention, "mamba2": Mamba2Mixer}


def build_mixer(config: ZebraLlamaConfig, index: int, kind: str | None = None) -> nn.Module:
    """A fresh mixer of ``kind`` (default: the config's type of layer ``index``) for decoder layer ``index``."""
    kind = kind or config.mixer(index)
    if kind not in MIXER_CLASSES:
        raise ValueError(f"unknown mixer {kind!r} (known: {', '.join(MIXER_CLASSES)})")
    return MIXER_CLASSES[kind](config, index)


class _MixerInit:
    """Mamba2's own initialisation for its parameters that transformers' generic one does not know."""

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, Mamba2Mixer):
            dt_min, dt_max, floor = module.dt_range
            device = module.A_log.device
            if device.type == "meta":
                return
            u = torch.rand(module.heads, device=device)
            dt = torch.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=floor)
            init.copy_(module.dt_bias, dt + torch.log(-torch.expm1(-dt)))
            init.copy_(module.A_log, torch.log(torch.empty(module.heads, device=device).uniform_(1, 16)))
            init.ones_(module.D)
            init.kaiming_uniform_(module.conv1d.weight, a=math.sqrt(5))
            init.zeros_(module.conv1d.bias)


class ZebraLlamaModel(_MixerInit, LlamaModel):
    """The decoder stack: Llama layers with per-layer mixers, and the hybrid cache."""

    config_class = ZebraLlamaConfig
    _is_stateful = True

    def __init__(self, config: ZebraLlamaConfig):
        LlamaPreTrainedModel.__init__(self, config)
        self.padding_idx, self.vocab_size = config.pad_token_id, config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        layers = []
        for index in range(config.num_hidden_layers):
            with torch.device("meta"):  # the stock attention is replaced at once: do not allocate it
                layer = LlamaDecoderLayer(config, index)
            layer.self_attn = build_mixer(config, index)
            layer.mlp = layer.mlp.to_empty(device=torch.get_default_device())
            layer.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
            layer.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
            layers.append(layer)
        self.layers = nn.ModuleList(layers)
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                use_cache=None, output_hidden_states=None, **kwargs):
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache is None:
            use_cache = bool(self.config.use_cache) and not self.training
        if use_cache and cache is None:
            cache = HybridCache(self.config.layer_types)
        length = inputs_embeds.shape[1]
        past = cache.seen_tokens if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + length, device=inputs_embeds.device)[None]
        if attention_mask is not None and attention_mask.dim() == 2 and bool(attention_mask.all()):
            attention_mask = None  # no padding: plain causal masks inside the mixers
        hidden = inputs_embeds
        position_embeddings = self.rotary_emb(hidden, position_ids=position_ids)
        states = [hidden] if output_hidden_states else None
        for layer in self.layers[: self.config.num_hidden_layers]:
            hidden = layer(hidden, attention_mask=attention_mask, position_embeddings=position_embeddings,
                           position_ids=position_ids, cache=cache, use_cache=use_cache, **kwargs)
            if states is not None:
                states.append(hidden)
        if cache is not None:
            cache.seen_tokens += length
        hidden = self.norm(hidden)
        if states is not None:
            states[-1] = hidden
        return BaseModelOutputWithPast(last_hidden_state=hidden, cache=cache if use_cache else None,
                                       hidden_states=tuple(states) if states is not None else None)


class ZebraLlamaForCausalLM(_MixerInit, LlamaForCausalLM):
    """The hybrid causal LM (the forward, loss and tied head of ``LlamaForCausalLM``)."""

    config_class = ZebraLlamaConfig
    _is_stateful = True
    _can_compile_fullgraph = False

    def __init__(self, config: ZebraLlamaConfig):
        LlamaPreTrainedModel.__init__(self, config)
        self.model = ZebraLlamaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the model makes its own HybridCache

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                labels=None, use_cache=None, logits_to_keep=0, **kwargs):
        kwargs.pop("past_key_values", None)
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               cache=cache, inputs_embeds=inputs_embeds, labels=labels, use_cache=use_cache,
                               logits_to_keep=logits_to_keep, **kwargs)

    def mixer_types(self) -> list[str]:
        return list(self.config.layer_types)

    def ssm_state_bytes(self, batch: int = 1) -> int:
        """Bytes of every Mamba2 layer's decode state for ``batch`` sequences (constant in the length)."""
        size = next(self.parameters()).element_size()
        return sum(layer.self_attn.state_bytes(batch, size) for layer in self.model.layers
                   if isinstance(layer.self_attn, Mamba2Mixer))


def register_auto_classes() -> None:
    """Let AutoConfig / AutoModelForCausalLM load ``zebra_llama`` folders without remote code."""
    from transformers import AutoConfig, AutoModelForCausalLM

    AutoConfig.register(ZebraLlamaConfig.model_type, ZebraLlamaConfig, exist_ok=True)
    AutoModelForCausalLM.register(ZebraLlamaConfig, ZebraLlamaForCausalLM, exist_ok=True)


__all__ = ["ZebraLlamaConfig", "ZebraLlamaForCausalLM", "ZebraLlamaModel", "build_mixer"]
