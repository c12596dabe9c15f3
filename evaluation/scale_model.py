"""A synthetic model with the real Llama-3-8B shapes and only a few decoder layers (benchmark fixture).

Llama-3-8B: hidden 4096, 32 query heads in 8 KV groups (head_dim 128), FFN 14336, vocab 128256,
32 layers, untied embeddings, RoPE θ 500000. :func:`scale_model` builds a ``LlamaForCausalLM`` of
those shapes with ``layers`` decoder layers and seeded random weights (normal, std 0.02; norms 1),
in float32 or bfloat16 (the embedding: 8192 random rows repeated over the vocabulary), from a
``LlamaConfig`` alone: nothing is downloaded. The weights are drawn
directly into the right dtype (the module is built on the meta device first, so no time goes to the
default initialisation). ``tie=True`` shares the embedding with the lm_head (the walk reads only the
embedding, for layer 0's inputs; it saves 525M parameters, 2.1 GB in float32); the real model is untied.

``shape="tiny"`` gives the same structure at toy widths (hidden 128, 4 heads of 32 in 2 KV groups, FFN 384,
vocab 49152: smollm2's tokenizer fits), for the dry runs and the tests.
"""

from __future__ import annotations

import torch

LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                 head_dim=128, vocab_size=128256, num_hidden_layers=32, rope_theta=500000.0,
                 max_position_embeddings=8192, rms_norm_eps=1e-5)
TINY = dict(hidden_size=128, intermediate_size=384, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
            vocab_size=49152, num_hidden_layers=32, rope_theta=500000.0, max_position_embeddings=8192,
            rms_norm_eps=1e-5)
SHAPES = {"llama3-8b": LLAMA3_8B, "tiny": TINY}


def scale_config(shape: str = "llama3-8b", layers: int = 2, tie: bool = False):
    from transformers import LlamaConfig

    values = dict(SHAPES[shape], num_hidden_layers=layers, tie_word_embeddings=tie, attention_bias=False,
                  mlp_bias=False, hidden_act="silu", initializer_range=0.02, use_cache=False)
    config = LlamaConfig(**values)
    config._attn_implementation = "sdpa"
    return config


def layer_parameters(config) -> int:
    """Parameters of one decoder layer (projections and the two norms)."""
    h, f, d = config.hidden_size, config.intermediate_size, config.head_dim
    q, kv = config.num_attention_heads * d, config.num_key_value_heads * d
    return h * (q + 2 * kv) + q * h + 3 * h * f + 2 * h


def model_parameters(config, layers: int | None = None, tie: bool | None = None) -> int:
    """Parameters of the whole model with ``layers`` decoder layers (default: the config's)."""
    layers = config.num_hidden_layers if layers is None else layers
    tie = config.tie_word_embeddings if tie is None else tie
    embed = config.vocab_size * config.hidden_size
    return layers * layer_parameters(config) + embed * (1 if tie else 2) + config.hidden_size


@torch.no_grad()
def scale_model(shape: str = "llama3-8b", layers: int = 2, dtype: torch.dtype = torch.float32, seed: int = 0,
                tie: bool = False):
    """The synthetic model (eval mode, on the host); see the module docstring."""
    from transformers import LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = scale_config(shape, layers, tie)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device="cpu").to(dtype)
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if param.ndim == 1:  # RMSNorm weights
            param.fill_(1.0)
        elif name.endswith("embed_tokens.weight") or name == "lm_head.weight":
            # 8192 random rows tiled over the vocabulary (drawing 525M normals takes ~30 s on 2 cores)
            rows = torch.randn(min(8192, param.shape[0]), param.shape[1], generator=generator)
            for start in range(0, param.shape[0], rows.shape[0]):
                block = param[start:start + rows.shape[0]]
                block.copy_(rows[:block.shape[0]].mul(config.initializer_range))
        else:  # drawn in float32 row blocks (bounded memory), then cast
            for start in range(0, param.shape[0], 4096):
                block = param[start:start + 4096]
                block.copy_(torch.randn(block.shape, generator=generator).mul_(config.initializer_range))
    model.model.rotary_emb = LlamaRotaryEmbedding(config=config)  # its buffers were on the meta device
    if tie:
        model.tie_weights()
    return model.eval()
