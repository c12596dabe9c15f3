"""The LLaMA layout map: the one module that knows how a LLaMA-family decoder is built.

Everything else (the staged forward, pruning, quantization targets, exporters, baselines) asks this
module instead of spelling projection names, head grouping or widths itself, so that a layout change
(another family, dropped layers, per-layer widths) is made here once.

A decoder layer is ``x → input_layernorm → self_attn(q, k, v → attention → o) → + x
→ post_attention_layernorm → mlp(act(gate)·up → down) → + r``. Its projections fall in four roles, in the order a forward reaches
them: ``attn_in`` (q, k, v read the residual stream), ``attn_out`` (o writes it back), ``mlp_in``
(gate, up) and ``mlp_out`` (down). Query head h covers rows [h·d, (h+1)·d) of q (columns of o), and
KV head g serves the ``heads / kv_heads`` consecutive query heads g·groups … g·groups + groups − 1.

Widths are read from the modules as they are now (a pruned model describes itself); depth pruning
(:func:`drop_layers`) records, in the config, which parent layer each present layer was.
:mod:`compress.modeling_pruned` is the self-contained copy of this knowledge that is saved beside
checkpoints; this module may import it, never the reverse.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, NamedTuple

import torch
from torch import nn

from compress.errors import CompressError

# model types whose decoder layers have the projections below
LLAMA_LIKE = frozenset({"llama", "mistral", "qwen2", "compress_llama"})
LAYERS_PATH = "model.layers"  # the decoder layers inside a causal LM

# the parts of a decoder layer, in forward order
INPUT_NORM, ATTENTION, POST_ATTENTION_NORM, MLP = "input_layernorm", "self_attn", "post_attention_layernorm", "mlp"
LAYER_PARTS = (INPUT_NORM, ATTENTION, POST_ATTENTION_NORM, MLP)

# the projections, named inside a decoder layer
Q, K, V, O = f"{ATTENTION}.q_proj", f"{ATTENTION}.k_proj", f"{ATTENTION}.v_proj", f"{ATTENTION}.o_proj"
GATE, UP, DOWN = f"{MLP}.gate_proj", f"{MLP}.up_proj", f"{MLP}.down_proj"
KV = (K, V)
ATTN_IN, ATTN_OUT, MLP_IN, MLP_OUT = (Q, K, V), (O,), (GATE, UP), (DOWN,)
# role → projections, in the order a forward reaches them (each role's modules share one input)
ROLES = {"attn_in": ATTN_IN, "attn_out": ATTN_OUT, "mlp_in": MLP_IN, "mlp_out": MLP_OUT}
SEQUENTIAL_GROUPS = tuple(ROLES.values())  # GPTQ's true-sequential order; the staged forward's points
PROJECTIONS = tuple(name for names in SEQUENTIAL_GROUPS for name in names)
SHORT_NAMES = tuple(name.split(".", 1)[1] for name in PROJECTIONS)  # q_proj, … as peft's target_modules
READS_HIDDEN = ATTN_IN + MLP_IN  # input width = hidden size, whatever a structured pruning did
WRITES_HIDDEN = ATTN_OUT + MLP_OUT  # output width = hidden size

# config keys of per-layer widths and provenance (see compress.modeling_pruned.CompressLlamaConfig)
PARENT_INDEX, PARENT_DEPTH = "layer_parent_index", "parent_num_hidden_layers"


def role(name: str) -> str | None:
    """``attn_in`` / ``attn_out`` / ``mlp_in`` / ``mlp_out`` of a projection named inside a layer."""
    return next((r for r, names in ROLES.items() if name in names), None)


def point(name: str) -> int | None:
    """The position (0–3) of a projection's input along the layer's forward (see the module docstring)."""
    r = role(name)
    return None if r is None else list(ROLES).index(r)


def module_name(index: int, name: str) -> str:
    """The full module name of ``name`` in decoder layer ``index`` (``model.layers.3.mlp.down_proj``)."""
    return f"{LAYERS_PATH}.{index}.{name}"


def layer_index(full_name: str) -> int | None:
    """The decoder layer index in a full module name, or None outside the decoder layers."""
    parts = full_name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part == "layers" and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return None


def projection(module: nn.Module, name: str) -> nn.Module:
    """The projection ``name`` (e.g. :data:`Q`) of a decoder layer, or of its attention or MLP block."""
    block, local = name.split(".", 1)
    return module.get_submodule(name if hasattr(module, block) else local)


def head_channels(heads: list[int], head_dim: int, device=None) -> torch.Tensor:
    """Row indices in q/k/v (column indices in o) of whole heads: head h covers [h·d, (h+1)·d)."""
    index = torch.tensor(heads, dtype=torch.long, device=device)
    return (index[:, None] * head_dim + torch.arange(head_dim, device=device)).reshape(-1)  # (len·d,)


def kv_groups(heads: int, kv_heads: int) -> list[list[int]]:
    """The query heads each KV head serves (grouped-query attention), KV head by KV head."""
    if kv_heads <= 0 or heads % kv_heads:
        raise CompressError(f"{heads} query heads cannot share {kv_heads} KV heads evenly")
    groups = heads // kv_heads
    return [[g * groups + j for j in range(groups)] for g in range(kv_heads)]


def projection_parameters(hidden: int, head_dim: int, heads: int, kv_heads: int, ffn: int) -> int:
    """Weights of the projections of ``heads`` query heads (q rows + o columns), ``kv_heads`` KV heads
    (k + v rows) and ``ffn`` channels (gate + up rows, down column); LLaMA projections have no bias."""
    return hidden * head_dim * (2 * heads + 2 * kv_heads) + 3 * hidden * ffn


class LayerWidths(NamedTuple):
    """The widths of one decoder layer (unpacks as ``heads, kv_heads, ffn``)."""

    heads: int  # query heads
    kv_heads: int  # key/value heads (the KV cache holds 2 · kv_heads · head_dim per token)
    ffn: int  # FFN channels (gate/up rows, down columns)

    @property
    def groups(self) -> int:
        """Query heads per KV head (0 for a layer without attention)."""
        return self.heads // self.kv_heads if self.kv_heads else 0


@dataclass
class Layout:
    """Widths and depth of a LLaMA-like model as it is now."""

    hidden: int
    head_dim: int
    layers: list[LayerWidths]
    kept_layers: list[int]  # the parent (original model's) index of each present layer
    parent_depth: int  # decoder layers of the parent model

    @property
    def depth(self) -> int:
        return len(self.layers)

    @property
    def dropped(self) -> list[int]:
        """Parent indices of the layers depth pruning removed."""
        kept = set(self.kept_layers)
        return [i for i in range(self.parent_depth) if i not in kept]

    @property
    def uniform(self) -> bool:
        """Every layer has the same widths."""
        return len(set(self.layers)) <= 1

    @property
    def heads(self) -> list[int]:
        return [w.heads for w in self.layers]

    @property
    def kv_heads(self) -> list[int]:
        return [w.kv_heads for w in self.layers]

    @property
    def ffn(self) -> list[int]:
        return [w.ffn for w in self.layers]

    def parameters(self, index: int | None = None) -> int:
        """Projection weights of layer ``index`` (all layers when None)."""
        layers = self.layers if index is None else [self.layers[index]]
        return sum(projection_parameters(self.hidden, self.head_dim, *w) for w in layers)

    def as_dict(self) -> dict:
        return {"hidden": self.hidden, "head_dim": self.head_dim, "heads": self.heads, "kv_heads": self.kv_heads,
                "ffn": self.ffn, "kept_layers": list(self.kept_layers), "parent_depth": self.parent_depth}


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of decoder layers of a LLaMA-like causal LM."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise CompressError(f"{type(model).__name__} has no decoder layers at {LAYERS_PATH}")
    return layers


def check_llama_like(model: nn.Module) -> None:
    """Raise unless the model is a LLaMA-family decoder this toolkit can walk."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    layers = getattr(getattr(model, "model", None), "layers", None)
    if model_type not in LLAMA_LIKE or layers is None:
        raise CompressError(f"model type '{model_type}' is not LLaMA-like "
                            f"(supported: {', '.join(sorted(LLAMA_LIKE - {'compress_llama'}))})")
    present = {name for layer in layers for name, _ in layer.named_modules()}  # a searched layer may lack some
    missing = [n for n in PROJECTIONS if n not in present]
    if missing:
        raise CompressError(f"model type '{model_type}' lacks the LLaMA layer modules {', '.join(missing)}")


def head_dim(config) -> int:
    """Channels per attention head (explicit in the config, else hidden / heads)."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def has_attention(layer: nn.Module) -> bool:
    """False for a layer whose attention was removed entirely (0 heads: ``NoAttention``)."""
    return hasattr(getattr(layer, ATTENTION, None), "q_proj")


def has_mlp(layer: nn.Module) -> bool:
    """False for a layer whose MLP was removed entirely (0 FFN channels: ``NoMLP``)."""
    return hasattr(getattr(layer, MLP, None), "down_proj")


def layer_widths(layer: nn.Module, head_dim: int) -> LayerWidths:
    """The widths of a decoder layer as its modules are now (0 heads / 0 channels where a searched
    sub-network has no attention / no MLP in this layer)."""
    heads = kv = ffn = 0
    if has_attention(layer):
        heads, kv = projection(layer, Q).out_features // head_dim, projection(layer, K).out_features // head_dim
    if has_mlp(layer):
        ffn = projection(layer, DOWN).in_features
    return LayerWidths(heads, kv, ffn)


def layout(model: nn.Module) -> Layout:
    """Widths, depth and provenance of ``model``; CompressError for a model without the LLaMA layout."""
    config = model.config
    layers = decoder_layers(model)
    try:
        d = head_dim(config)
        widths = [layer_widths(layer, d) for layer in layers]
        hidden = config.hidden_size
    except AttributeError as exc:
        raise CompressError(f"{type(model).__name__} does not have the LLaMA layout: {exc}") from None
    kept = getattr(config, PARENT_INDEX, None)
    if not isinstance(kept, (list, tuple)) or len(kept) != len(widths):
        kept = range(len(widths))  # no provenance (or stale): the model is its own parent
    kept = [int(i) for i in kept]
    parent = getattr(config, PARENT_DEPTH, None) or (max(kept) + 1 if kept else 0)
    return Layout(hidden, d, widths, kept, max(int(parent), len(kept)))


def drop_layers(model: nn.Module, indices: Iterable[int]) -> Layout:
    """Remove decoder layers ``indices`` (positions in the model as it is now) in place; returns the new layout.

    The remaining attentions are re-indexed (``layer_idx``: their slot in the KV cache), and the config
    gets the present depth, its per-layer lists cut alike and ``layer_parent_index`` /
    ``parent_num_hidden_layers`` (which parent layer each present one is), so dropping twice composes.
    """
    from compress.modeling_pruned import PER_LAYER_FIELDS

    before = layout(model)
    layers = decoder_layers(model)
    n = len(layers)
    drop = sorted({int(i) for i in indices})
    outside = [i for i in drop if not 0 <= i < n]
    if outside:
        raise CompressError(f"cannot drop layer {outside[0]}: the model has layers 0..{n - 1}")
    if len(drop) >= n:
        raise CompressError(f"dropping layers {drop} would leave no decoder layer")
    keep = [i for i in range(n) if i not in set(drop)]
    model.model.layers = nn.ModuleList([layers[i] for i in keep])
    for new, layer in enumerate(model.model.layers):
        for module in layer.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new  # the KV cache slot
    config = model.config
    config.num_hidden_layers = len(keep)
    for key in (*PER_LAYER_FIELDS, "layer_types", "mlp_layer_types"):
        values = getattr(config, key, None)
        if isinstance(values, (list, tuple)) and len(values) == n:
            setattr(config, key, [values[i] for i in keep])
    setattr(config, PARENT_INDEX, [before.kept_layers[i] for i in keep])
    setattr(config, PARENT_DEPTH, before.parent_depth)
    return layout(model)


def output_biases(model: nn.Module, config=None) -> tuple[bool, bool]:
    """Whether o_proj / down_proj carry a bias that the config's ``attention_bias`` / ``mlp_bias`` do not
    already describe (a compensation bias added by structured pruning): (o_proj, down_proj)."""
    config = config if config is not None else model.config
    layers = decoder_layers(model)
    o_bias = not getattr(config, "attention_bias", False) and any(
        projection(layer, O).bias is not None for layer in layers if has_attention(layer))
    down_bias = not getattr(config, "mlp_bias", False) and any(
        projection(layer, DOWN).bias is not None for layer in layers if has_mlp(layer))
    return o_bias, down_bias


def width_config(model: nn.Module):
    """``(config, extra_files)``: the config that describes the model's present widths and depth, and the
    files to write beside it.

    The model's own config when it already does (untouched widths; depth pruning keeps it current);
    a plain ``LlamaConfig`` when every layer has the same widths; else a ``CompressLlamaConfig`` with
    per-layer lists and ``modeling_compress_llama.py``. A model without the LLaMA layout: its config.
    """
    from compress.modeling_pruned import FILE_NAME, MODEL_TYPE, modeling_source, per_layer_config

    config = model.config
    try:
        lay = layout(model)
    except CompressError:
        return config, {}
    o_bias, down_bias = output_biases(model, config)
    unchanged = (set(lay.heads) == {config.num_attention_heads} and set(lay.kv_heads) == {config.num_key_value_heads}
                 and set(lay.ffn) == {config.intermediate_size} and config.num_hidden_layers == lay.depth
                 and config.model_type != MODEL_TYPE and not (o_bias or down_bias))
    if unchanged:
        return config, {}
    dropped = bool(lay.dropped)
    new = per_layer_config(config, lay.heads, lay.kv_heads, lay.ffn,
                           parent_index=lay.kept_layers if dropped else None,
                           parent_depth=lay.parent_depth if dropped else None, o_bias=o_bias, down_bias=down_bias)
    new._attn_implementation = config._attn_implementation
    extra = {FILE_NAME: modeling_source()} if getattr(new, "auto_map", None) else {}
    return new, extra
