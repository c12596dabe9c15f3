"""Tiny models with uneven layers and their logits, shared by the layout-map and exporter tests."""

from __future__ import annotations

import torch

from compress.methods.slimgpt.shrink import shrink_attention, shrink_mlp
from tests.helpers import make_tiny_llama

IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(3))


def uneven_tiny(layers: int = 4):
    """A tiny Llama (4 heads in 2 KV groups, head_dim 16, FFN 96) whose layer 1 keeps 2 heads and 64 channels."""
    model = make_tiny_llama(num_hidden_layers=layers)
    layer = model.model.layers[1]
    shrink_attention(layer.self_attn, layer.self_attn.o_proj.weight.detach(), [0, 2], [0, 1], 16)
    shrink_mlp(layer.mlp, layer.mlp.down_proj.weight.detach(), list(range(64)))
    return model


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits
