"""Physically remove attention heads and FFN channels from a LlamaDecoderLayer.

The compensated ``o_proj`` / ``down_proj`` keep only their surviving input columns; the matching
output rows of q/k/v and gate/up are dropped without compensation (SlimGPT §3.1). The attention
module's ``num_key_value_groups`` is updated so transformers' attention (eager, SDPA, flash) and its
KV cache keep working.
"""

from __future__ import annotations

import torch
from torch import nn

from compress import arch
from compress.arch import head_channels, layer_widths  # noqa: F401  (re-exported: the layout map owns them)


def _set_weight(linear: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    linear.weight = nn.Parameter(weight.to(linear.weight.dtype).contiguous(), requires_grad=False)
    if linear.bias is not None and bias is not None:
        linear.bias = nn.Parameter(bias.to(linear.bias.dtype).contiguous(), requires_grad=False)
    linear.out_features, linear.in_features = linear.weight.shape


def _rows(linear: nn.Linear, index: torch.Tensor) -> None:
    bias = linear.bias[index] if linear.bias is not None else None
    _set_weight(linear, linear.weight[index], bias)


def shrink_attention(attn: nn.Module, o_weight: torch.Tensor, kept_heads: list[int], kept_kv: list[int],
                     head_dim: int) -> None:
    """Keep query heads ``kept_heads`` and KV heads ``kept_kv``; ``o_weight`` is the compensated o_proj.

    Each kept KV head must keep the same number of query heads, listed group by group.
    """
    if len(kept_heads) % len(kept_kv):
        raise ValueError(f"{len(kept_heads)} query heads cannot share {len(kept_kv)} KV heads evenly")
    o_proj = arch.projection(attn, arch.O)
    device = o_proj.weight.device
    q_index = head_channels(kept_heads, head_dim, device)
    kv_index = head_channels(kept_kv, head_dim, device)
    _rows(arch.projection(attn, arch.Q), q_index)
    for name in arch.KV:
        _rows(arch.projection(attn, name), kv_index)
    _set_weight(o_proj, o_weight[:, q_index], o_proj.bias)
    attn.num_key_value_groups = len(kept_heads) // len(kept_kv)


def shrink_mlp(mlp: nn.Module, down_weight: torch.Tensor, kept: list[int]) -> None:
    """Keep FFN channels ``kept``; ``down_weight`` is the compensated down_proj."""
    down = arch.projection(mlp, arch.DOWN)
    index = torch.tensor(kept, dtype=torch.long, device=down.weight.device)
    for name in arch.MLP_IN:
        _rows(arch.projection(mlp, name), index)
    _set_weight(down, down_weight[:, index], down.bias)
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = len(kept)


def add_bias(linear: nn.Linear, bias: torch.Tensor) -> None:
    """Add ``bias`` (out_features) to the Linear's bias, creating one (zeros) if it has none: the mean
    contribution of removed inputs (FLAP's bias compensation)."""
    base = linear.bias.detach() if linear.bias is not None else torch.zeros(
        linear.out_features, dtype=linear.weight.dtype, device=linear.weight.device)
    linear.bias = nn.Parameter((base.double() + bias.to(base.device).double()).to(linear.weight.dtype),
                               requires_grad=False)


def refresh_attributes(layer: nn.Module, head_dim: int) -> None:
    """Set the attributes a LlamaDecoderLayer derives from its widths (``num_key_value_groups``, read by
    every attention back-end, and the MLP's ``intermediate_size``) from its projections as they are now,
    e.g. after a pruned layer's tensors were loaded into the unpruned modules (a resumed walk)."""
    widths = layer_widths(layer, head_dim)
    if widths.kv_heads <= 0 or widths.heads % widths.kv_heads:
        raise ValueError(f"{widths.heads} query heads cannot share {widths.kv_heads} KV heads evenly")
    layer.self_attn.num_key_value_groups = widths.heads // widths.kv_heads
    if hasattr(layer.mlp, "intermediate_size"):
        layer.mlp.intermediate_size = widths.ffn
