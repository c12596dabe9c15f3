"""The generation cache of a hybrid: per layer, what its mixer needs to continue a sequence.

* ``attention`` layers: keys and values, ``(b, kv_heads, t, head_dim)`` each (a transformers
  ``DynamicLayer``);
* ``mla`` layers: the latent ``c_kv`` ``(b, 1, t, kv_lora_rank)`` as "keys" and the shared RoPE key
  ``(b, 1, t, qk_rope_head_dim)`` as "values" (a ``DynamicLayer`` too): r_kv + d_rope numbers per token;
* ``mamba2`` layers: the last ``d_conv − 1`` convolution inputs and the SSM state ``(b, heads,
  head_dim, d_state)``, of constant size.

It is a transformers ``Cache``, so ``model.generate`` carries it from step to step; the model
creates it on the first forward with ``use_cache=True``.

Self-contained (imports only torch and transformers).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer, LinearAttentionCacheLayerMixin


class MambaStateLayer(LinearAttentionCacheLayerMixin):
    """Conv state (b, channels, d_conv − 1) and SSM state (b, heads, head_dim, d_state) of one Mamba2 layer."""

    def lazy_initialization(self, conv_states=None, recurrent_states=None, state_idx: int = 0) -> None:
        if conv_states is not None and self.device is None:
            self.dtype, self.device = conv_states.dtype, conv_states.device

    def update_conv_state(self, conv_states: torch.Tensor, state_idx: int = 0, **kwargs) -> torch.Tensor:
        self.lazy_initialization(conv_states=conv_states)
        self.conv_states[state_idx] = conv_states
        self.is_conv_states_initialized[state_idx] = True
        self.has_previous_state[state_idx] = True
        return conv_states

    def update_recurrent_state(self, recurrent_states: torch.Tensor, state_idx: int = 0, **kwargs) -> torch.Tensor:
        self.recurrent_states[state_idx] = recurrent_states
        self.is_recurrent_states_initialized[state_idx] = True
        return recurrent_states

    @property
    def batch_size(self) -> int:
        state = self.recurrent_states[0]
        return -1 if state is None else state.shape[0]

    def state_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.conv_states[0], self.recurrent_states[0])
                   if t is not None)


class HybridCache(Cache):
    """One cache layer per decoder layer, of the kind its mixer needs (see the module docstring)."""

    def __init__(self, layer_types: list[str]):
        layers = [MambaStateLayer() if kind == "mamba2" else DynamicLayer() for kind in layer_types]
        super().__init__(layers=layers)
        self.layer_types = list(layer_types)
        self.seen_tokens = 0  # tokens already processed (advanced by the model after each forward)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        if isinstance(self.layers[layer_idx], MambaStateLayer):
            return self.seen_tokens
        return self.layers[layer_idx].get_seq_length()

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        return self.seen_tokens + query_length, 0

    def mamba_state(self, layer_idx: int):
        """(conv_state, ssm_state) of a Mamba2 layer, or (None, None) before its first token."""
        layer = self.layers[layer_idx]
        if not layer.has_previous_state[0]:
            return None, None
        return layer.conv_states[0], layer.recurrent_states[0]

    def set_mamba_state(self, layer_idx: int, conv_state: torch.Tensor, ssm_state: torch.Tensor) -> None:
        self.layers[layer_idx].update_conv_state(conv_state)
        self.layers[layer_idx].update_recurrent_state(ssm_state)

    def reset(self) -> None:
        super().reset()
        self.seen_tokens = 0

    @property
    def is_compileable(self) -> bool:
        return False

    def bytes_per_layer(self) -> list[int]:
        """Bytes held now by each layer (keys/values or latents, or the Mamba2 states)."""
        out = []
        for layer in self.layers:
            if isinstance(layer, MambaStateLayer):
                out.append(layer.state_bytes())
            else:
                tensors = [t for t in (getattr(layer, "keys", None), getattr(layer, "values", None))
                           if isinstance(t, torch.Tensor)]
                out.append(sum(t.numel() * t.element_size() for t in tensors))
        return out
