"""Sub-networks of a parent that share its weights.

:func:`reorder` permutes every layer's query heads (within their KV groups, or the KV groups as a whole)
and FFN channels into the importance order, in place: the model computes exactly what it did, and a
sub-network becomes "the first k units / channels of each layer, these layers kept".

:func:`subnet` evaluates one without copying the model: inside the context the kept layers' projections
read views of the parent's weights (FFN prefixes, KV-group prefixes; with ``query`` units the kept query
rows / o columns are gathered, a small copy), a layer without attention or MLP gets ``NoAttention`` /
``NoMLP`` and dropped layers leave the layer list; everything is put back on exit. Gradients reach the
parent's parameters through the views (the super-network training uses it). With a
:class:`compress.search.compensation.Compensation` the kept o_proj / down_proj columns are the
OBS-updated ones instead (computed, no gradient).

:func:`materialize` turns the model itself into the sub-network (real, contiguous tensors; dropped
layers removed with provenance), ready for any exporter.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from compress import arch
from compress.modeling_pruned import NoAttention, NoMLP
from compress.search.profile import kv_order, unit_heads
from compress.search.space import Option, SearchSpace


def _permute_rows(linear: nn.Linear, index: torch.Tensor) -> None:
    linear.weight.data = linear.weight.data[index].contiguous()
    if linear.bias is not None:
        linear.bias.data = linear.bias.data[index].contiguous()


def _permute_cols(linear: nn.Linear, index: torch.Tensor) -> None:
    linear.weight.data = linear.weight.data[:, index].contiguous()


@torch.no_grad()
def reorder(model: nn.Module, space: SearchSpace, heads: dict[int, list[int]], channels: dict[int, list[int]]) -> None:
    """Permute each layer's heads and channels into the importance order (function-preserving)."""
    d = space.head_dim
    for i, layer in enumerate(arch.decoder_layers(model)):
        q_index = arch.head_channels(heads[i], d)
        kv_index = arch.head_channels(kv_order(heads[i], space), d)
        _permute_rows(arch.projection(layer, arch.Q), q_index)
        for name in arch.KV:
            _permute_rows(arch.projection(layer, name), kv_index)
        _permute_cols(arch.projection(layer, arch.O), q_index)
        f_index = torch.tensor(channels[i], dtype=torch.long)
        for name in arch.MLP_IN:
            _permute_rows(arch.projection(layer, name), f_index)
        _permute_cols(arch.projection(layer, arch.DOWN), f_index)


def _slices(space: SearchSpace, option: Option):
    """(q rows, kv rows, ffn width) of an option in a reordered layer; rows as a slice when contiguous."""
    d = space.head_dim
    heads, kv, ffn = space.widths(option)
    if space.unit == "kv" or option.a == space.attention_units:
        q_rows, kv_rows = slice(0, heads * d), slice(0, kv * d)
    else:
        q_rows, kv_rows = arch.head_channels(unit_heads(space, option.a), d), slice(0, kv * d)
    return q_rows, kv_rows, ffn


def _set(linear: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None, saved: list) -> None:
    saved.append((linear, linear._parameters["weight"], linear._parameters.get("bias"),
                  linear.in_features, linear.out_features))
    linear._parameters["weight"] = weight  # a view (or a small gather): autograd reaches the parent
    if "bias" in linear._parameters:
        linear._parameters["bias"] = bias
    linear.out_features, linear.in_features = weight.shape


@contextmanager
def subnet(model: nn.Module, space: SearchSpace, choice: list[Option], compensation=None):
    """Inside the context ``model`` (reordered, unpruned) computes the sub-network ``choice`` (its kept
    o_proj / down_proj columns compensated when ``compensation`` is given)."""
    base = model.model
    layers = base.layers
    saved: list = []
    swapped: list = []  # (owner, attribute, original value): modules swapped out, num_key_value_groups
    kept = []
    try:
        for index, (layer, option) in enumerate(zip(layers, choice)):
            if option == (0, 0):
                continue
            kept.append(layer)
            attn, mlp = layer.self_attn, layer.mlp
            if option.a == 0:
                swapped.append((layer, "self_attn", attn))
                layer.self_attn = NoAttention(space.head_dim, getattr(attn, "layer_idx", None))
            elif option.a < space.attention_units:
                q_rows, kv_rows, _ = _slices(space, option)
                swapped.append((attn, "num_key_value_groups", attn.num_key_value_groups))
                q = attn.q_proj
                _set(q, q.weight[q_rows], None if q.bias is None else q.bias[q_rows], saved)
                for name in ("k_proj", "v_proj"):
                    lin = getattr(attn, name)
                    _set(lin, lin.weight[kv_rows], None if lin.bias is None else lin.bias[kv_rows], saved)
                heads, kv, _ = space.widths(option)
                attn.num_key_value_groups = heads // kv
                o = attn.o_proj
                w_o = o.weight[:, q_rows] if compensation is None else compensation.o_weight(index, o.weight, option.a)
                _set(o, w_o, o.bias, saved)
            if option.f == 0:
                swapped.append((layer, "mlp", mlp))
                layer.mlp = NoMLP()
            elif option.f < space.ffn_options:
                width = space.ffn_width(option.f)
                for name in ("gate_proj", "up_proj"):
                    lin = getattr(mlp, name)
                    _set(lin, lin.weight[:width], None if lin.bias is None else lin.bias[:width], saved)
                down = mlp.down_proj
                w_d = down.weight[:, :width] if compensation is None else \
                    compensation.down_weight(index, down.weight, option.f)
                _set(down, w_d, down.bias, saved)
        base.layers = nn.ModuleList(kept) if len(kept) != len(layers) else layers
        yield model
    finally:
        base.layers = layers
        for linear, weight, bias, fan_in, fan_out in reversed(saved):
            linear._parameters["weight"] = weight
            if "bias" in linear._parameters:
                linear._parameters["bias"] = bias
            linear.in_features, linear.out_features = fan_in, fan_out
        for owner, attribute, original in reversed(swapped):
            setattr(owner, attribute, original)


@torch.no_grad()
def materialize(model: nn.Module, space: SearchSpace, choice: list[Option], compensation=None) -> nn.Module:
    """Make ``model`` (reordered, unpruned) the sub-network ``choice`` in place: kept prefixes as real
    tensors (o_proj / down_proj compensated when ``compensation`` is given), no-attention / no-MLP
    layers, dropped layers removed (with provenance). Returns the model."""
    from compress.methods.slimgpt.shrink import shrink_attention, shrink_mlp

    layers = arch.decoder_layers(model)
    for index, (layer, option) in enumerate(zip(layers, choice)):
        if option == (0, 0):
            continue
        heads, kv, ffn = space.widths(option)
        w_o, w_d = compensation.full_weights(index, layer, option) if compensation is not None else (None, None)
        if option.a == 0:
            layer.self_attn = NoAttention(space.head_dim, getattr(layer.self_attn, "layer_idx", None))
        elif option.a < space.attention_units:
            kept_heads = unit_heads(space, option.a)
            kept_kv = list(range(kv))
            o = layer.self_attn.o_proj
            shrink_attention(layer.self_attn, o.weight.detach() if w_o is None else w_o, kept_heads, kept_kv,
                             space.head_dim)
        if option.f == 0:
            layer.mlp = NoMLP()
        elif option.f < space.ffn_options:
            w = layer.mlp.down_proj.weight.detach() if w_d is None else w_d
            shrink_mlp(layer.mlp, w, list(range(ffn)))
    for p in model.parameters():
        p.requires_grad_(False)
    dropped = [i for i, o in enumerate(choice) if o == (0, 0)]
    if dropped:
        arch.drop_layers(model, dropped)
    return model
