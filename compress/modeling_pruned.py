"""A Llama whose decoder layers each have their own width: query heads, KV heads and FFN channels.

Structured pruning with a non-uniform schedule (SlimGPT's Incremental Pruning Ratio, NAS) leaves
layers of different widths, which a plain ``LlamaConfig`` cannot describe. ``CompressLlamaConfig``
adds three per-layer lists; ``CompressLlamaForCausalLM`` builds the stock Llama and then resizes each
layer's projections, so the forward, the attention back-ends and the KV cache are transformers' own.
A structured pruning that compensates the removed units' mean contribution (FLAP, SlimGPT's ``bias``
option) gives o_proj and/or down_proj a bias: ``o_proj_bias`` / ``down_proj_bias`` say so (LlamaConfig's
``attention_bias`` / ``mlp_bias`` would add biases to every projection of the block).
Depth pruning is described by ``num_hidden_layers`` (the present layers, indexed 0..n-1 in the
weights and the KV cache) plus, for provenance, ``layer_parent_index`` (the original index of each
present layer) and ``parent_num_hidden_layers``; a plain ``LlamaConfig`` carries the same two keys
when only the depth changed.

This file is self-contained (it imports only torch and transformers): it is copied beside a
non-uniform checkpoint as ``modeling_compress_llama.py`` so that
``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`` reloads it, and
:func:`register_auto_classes` lets the package reload it without remote code.
"""

from __future__ import annotations

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

MODEL_TYPE = "compress_llama"
SAVED_MODEL_TYPE = "llama"  # what config.json says (see CompressLlamaConfig.to_dict)
FILE_NAME = "modeling_compress_llama.py"
PER_LAYER_FIELDS = ("layer_num_attention_heads", "layer_num_key_value_heads", "layer_intermediate_size")
PROVENANCE_FIELDS = ("layer_parent_index", "parent_num_hidden_layers")


@strict
class CompressLlamaConfig(LlamaConfig):
    """LlamaConfig plus per-layer widths (None: the uniform value of the base fields)."""

    model_type = "compress_llama"
    layer_num_attention_heads: list[int] | None = None
    layer_num_key_value_heads: list[int] | None = None
    layer_intermediate_size: list[int] | None = None
    layer_parent_index: list[int] | None = None  # depth pruning: the parent index of each present layer
    parent_num_hidden_layers: int | None = None  # depth pruning: the parent's number of layers
    o_proj_bias: bool = False  # every layer's o_proj has a bias (mean compensation of removed heads)
    down_proj_bias: bool = False  # every layer's down_proj has a bias (mean compensation of removed channels)

    def validate_architecture(self):
        # head_dim is explicit, so the hidden size need not be a multiple of the head count.
        n = self.num_hidden_layers
        for name in PER_LAYER_FIELDS + ("layer_parent_index",):
            values = getattr(self, name)
            if values is not None and len(values) != n:
                raise ValueError(f"{name} has {len(values)} entries for {n} layers")
        parents = self.layer_parent_index
        if parents is not None:
            limit = self.parent_num_hidden_layers or (max(parents, default=-1) + 1)
            if any(b <= a for a, b in zip(parents, parents[1:])) or min(parents, default=0) < 0 or \
                    max(parents, default=0) >= limit:
                raise ValueError(f"layer_parent_index {parents} must increase within 0..{limit - 1}")
        for q, kv in zip(self.heads(), self.kv_heads()):
            if (q, kv) != (0, 0) and (q <= 0 or kv <= 0 or q % kv):
                raise ValueError(f"a layer has {q} query heads and {kv} KV heads; need a positive multiple "
                                 "(or 0 and 0: a layer without attention)")
        if any(f < 0 for f in self.ffn()):
            raise ValueError(f"layer_intermediate_size {self.ffn()} has a negative width")

    def to_dict(self) -> dict:
        # config.json names the stock type: AutoConfig and AutoTokenizer read the folder without remote
        # code; the per-layer fields and auto_map still route the model class to this file.
        return {**super().to_dict(), "model_type": SAVED_MODEL_TYPE}

    @classmethod
    def get_config_dict(cls, *args, **kwargs):
        config_dict, kwargs = super().get_config_dict(*args, **kwargs)
        if config_dict.get("model_type") == SAVED_MODEL_TYPE:  # our own config.json: no type mismatch
            config_dict = {**config_dict, "model_type": MODEL_TYPE}
        return config_dict, kwargs

    def heads(self) -> list[int]:
        return list(self.layer_num_attention_heads or [self.num_attention_heads] * self.num_hidden_layers)

    def kv_heads(self) -> list[int]:
        return list(self.layer_num_key_value_heads or [self.num_key_value_heads] * self.num_hidden_layers)

    def ffn(self) -> list[int]:
        return list(self.layer_intermediate_size or [self.intermediate_size] * self.num_hidden_layers)


def _resized(linear: nn.Linear, in_features: int, out_features: int, bias: bool | None = None) -> nn.Linear:
    bias = linear.bias is not None if bias is None else bias or linear.bias is not None
    if (linear.in_features, linear.out_features, linear.bias is not None) == (in_features, out_features, bias):
        return linear
    return nn.Linear(in_features, out_features, bias=bias, device=linear.weight.device, dtype=linear.weight.dtype)


class NoAttention(nn.Module):
    """The attention of a layer that has none (0 heads: a searched sub-network): it adds nothing to the
    residual stream. With a KV cache it stores an empty (b, 0, L, d) key and value, so the cache still
    counts the sequence's length at this layer and holds no bytes."""

    def __init__(self, head_dim: int, layer_idx: int | None = None):
        super().__init__()
        self.head_dim, self.layer_idx = head_dim, layer_idx
        self.num_key_value_groups = 1

    def forward(self, hidden_states: torch.Tensor, position_embeddings=None, attention_mask=None, cache=None,
                **kwargs):
        cache = cache if cache is not None else kwargs.pop("past_key_values", None)
        if cache is not None:
            b, length = hidden_states.shape[:2]
            empty = hidden_states.new_zeros(b, 0, length, self.head_dim)
            cache.update(empty, empty, self.layer_idx, kwargs=kwargs)
        return torch.zeros_like(hidden_states), None


class NoMLP(nn.Module):
    """The MLP of a layer that has none (0 FFN channels): it adds nothing to the residual stream."""

    intermediate_size = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)


def resize_layer(layer: nn.Module, heads: int, kv_heads: int, ffn: int, head_dim: int,
                 o_bias: bool = False, down_bias: bool = False) -> None:
    """Give one LlamaDecoderLayer ``heads`` query heads, ``kv_heads`` KV heads and ``ffn`` channels
    (and a bias on o_proj / down_proj when asked); 0 heads or 0 channels leave no attention / no MLP."""
    if heads == 0:
        layer.self_attn = NoAttention(head_dim, getattr(layer.self_attn, "layer_idx", None))
    if ffn == 0:
        layer.mlp = NoMLP()
    if heads:
        _resize_attention(layer.self_attn, heads, kv_heads, head_dim, o_bias)
    if ffn:
        _resize_mlp(layer.mlp, ffn, down_bias)


def _resize_attention(attn: nn.Module, heads: int, kv_heads: int, head_dim: int, o_bias: bool) -> None:
    hidden = attn.q_proj.in_features
    attn.q_proj = _resized(attn.q_proj, hidden, heads * head_dim)
    attn.k_proj = _resized(attn.k_proj, hidden, kv_heads * head_dim)
    attn.v_proj = _resized(attn.v_proj, hidden, kv_heads * head_dim)
    attn.o_proj = _resized(attn.o_proj, heads * head_dim, hidden, o_bias)
    attn.num_key_value_groups = heads // kv_heads  # used by repeat_kv / GQA in every attention back-end


def _resize_mlp(mlp: nn.Module, ffn: int, down_bias: bool) -> None:
    hidden = mlp.gate_proj.in_features
    mlp.gate_proj = _resized(mlp.gate_proj, hidden, ffn)
    mlp.up_proj = _resized(mlp.up_proj, hidden, ffn)
    mlp.down_proj = _resized(mlp.down_proj, ffn, hidden, down_bias)
    mlp.intermediate_size = ffn


class CompressLlamaForCausalLM(LlamaForCausalLM):
    """The stock Llama causal LM with each decoder layer resized to its width in the config."""

    config_class = CompressLlamaConfig

    def __init__(self, config: CompressLlamaConfig):
        super().__init__(config)
        for layer, q, kv, f in zip(self.model.layers, config.heads(), config.kv_heads(), config.ffn()):
            resize_layer(layer, q, kv, f, config.head_dim, config.o_proj_bias, config.down_proj_bias)
        self.post_init()


def register_auto_classes() -> None:
    """Let AutoConfig / AutoModelForCausalLM load ``compress_llama`` folders without remote code."""
    from transformers import AutoConfig, AutoModelForCausalLM

    AutoConfig.register(MODEL_TYPE, CompressLlamaConfig, exist_ok=True)
    AutoModelForCausalLM.register(CompressLlamaConfig, CompressLlamaForCausalLM, exist_ok=True)


def per_layer_config(base: LlamaConfig, heads: list[int], kv_heads: list[int], ffn: list[int],
                     parent_index: list[int] | None = None, parent_depth: int | None = None,
                     o_bias: bool = False, down_bias: bool = False) -> LlamaConfig:
    """The config that describes ``len(heads)`` layers of these widths: a plain LlamaConfig when every
    layer has the same widths, no o_proj / down_proj bias and the stock checks accept them, else a
    CompressLlamaConfig with an ``auto_map``. ``parent_index`` / ``parent_depth`` record which parent
    layers were kept (depth pruning)."""
    values = base.to_dict()
    for key in ("model_type", "auto_map", "architectures", "transformers_version", *PER_LAYER_FIELDS,
                *PROVENANCE_FIELDS, "o_proj_bias", "down_proj_bias"):
        values.pop(key, None)
    values["head_dim"] = base.head_dim
    values["num_hidden_layers"] = len(heads)
    if parent_index is not None:
        values.update(layer_parent_index=list(parent_index), parent_num_hidden_layers=parent_depth)
    uniform = len(set(heads)) == 1 and len(set(kv_heads)) == 1 and len(set(ffn)) == 1
    # the base fields: the first layer with attention / an MLP (a layer may have none: 0 heads, 0 channels)
    base_heads = next(((q, kv) for q, kv in zip(heads, kv_heads) if q), (base.num_attention_heads,
                                                                        base.num_key_value_heads))
    values.update(num_attention_heads=base_heads[0], num_key_value_heads=base_heads[1],
                  intermediate_size=next((f for f in ffn if f), base.intermediate_size))
    if uniform and heads[0] and ffn[0] and not (o_bias or down_bias) and values["hidden_size"] % heads[0] == 0:
        config = LlamaConfig(**values)
        config.architectures = ["LlamaForCausalLM"]
        return config
    config = CompressLlamaConfig(**values, layer_num_attention_heads=list(heads),
                                 layer_num_key_value_heads=list(kv_heads), layer_intermediate_size=list(ffn),
                                 o_proj_bias=bool(o_bias), down_proj_bias=bool(down_bias))
    config.architectures = ["CompressLlamaForCausalLM"]
    config.auto_map = {"AutoConfig": f"{FILE_NAME[:-3]}.CompressLlamaConfig",
                       "AutoModelForCausalLM": f"{FILE_NAME[:-3]}.CompressLlamaForCausalLM"}
    return config


def modeling_source() -> str:
    """This file's text, to be saved beside a checkpoint as ``modeling_compress_llama.py``."""
    import inspect
    import sys

    return inspect.getsource(sys.modules[__name__])


__all__ = ["CompressLlamaConfig", "CompressLlamaForCausalLM"]
