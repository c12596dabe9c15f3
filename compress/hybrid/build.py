"""Build a Zebra-Llama hybrid from a Llama: each layer's mixer initialised from that layer's attention.

* MLA by SVD (X-EcoMLA) after a partial-RoPE reordering (MHA2MLA): each head's q and k channels are laid
  out [slow RoPE pairs ; fast pairs] (:func:`rope_permutation`), MLA's RoPE rotating the fast pairs at the
  parent's own frequencies. W_q = U S Vᵀ → ``q_a`` = S[:r_q] Vᵀ[:r_q], ``q_b`` = U[:, :r_q]. The joint
  [W_k nope rows; W_v] = U S Vᵀ → ``kv_a`` = S[:r_kv] Vᵀ[:r_kv], plus d_rope rows for the shared RoPE key (the
  mean over KV heads of each key head's fast rows); ``kv_b`` = U[:, :r_kv], per KV head its nope key rows
  then its value rows. ``o_proj`` is reused. At full rank q_b·q_a = W_q and kv_b·kv_a[:r_kv] gives the nope
  keys and W_v exactly (up to float64 SVD round-off); the slow pairs' rotation and the per-head RoPE keys are
  what the initialisation approximates (docs/hybrid.md).
* Mamba2 (MambaInLlama): ``in_proj`` rows x ← W_v, B ← W_k, C ← W_q, ``out_proj`` ← W_o; z, dt, the
  convolution, A_log, dt_bias, D and the gated norm keep Mamba2's fresh initialisation.

:func:`hybridize` builds the whole model; :func:`mla_from_attention` / :func:`mamba2_from_attention`
build one layer's mixer (what a layer-wise distillation starts from).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from compress.errors import CompressError
from compress.hybrid.configuration_zebra_llama import ZebraLlamaConfig
from compress.hybrid.modeling_zebra_llama import ZebraLlamaForCausalLM, build_mixer
from compress.hybrid.zebra_attention import MLAttention
from compress.hybrid.zebra_mamba2 import Mamba2Mixer

# names the MLA initialisation's layout: runs that keep trained mixers (distillation state) fingerprint it, so a
# state folder written under another layout is refused instead of mixed in
MLA_INIT = "partial-rope-fast-pairs"

# config keys of the parent that do not describe the hybrid
_DROP_KEYS = ("model_type", "auto_map", "architectures", "transformers_version", "layer_types",
              "layer_num_attention_heads", "layer_num_key_value_heads", "layer_intermediate_size",
              "_name_or_path", "quantization_config")


@dataclass
class HybridShape:
    """The parent's attention widths that every hybrid layer shares."""

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    layers: int

    @property
    def max_q_rank(self) -> int:
        return min(self.heads * self.head_dim, self.hidden)

    @property
    def max_kv_rank(self) -> int:
        return min(2 * self.kv_heads * self.head_dim, self.hidden)

    def default_ranks(self) -> tuple[int, int, int]:
        """(q_rank, kv_rank, rope_dim): ⅔ of the largest q rank rounded down to a multiple of 32, min(128, the
        largest kv rank), head_dim / 2. For smollm2-135m: 384, 128, 32."""
        q = max(32, (2 * self.max_q_rank // 3) // 32 * 32)
        return min(q, self.max_q_rank), min(128, self.max_kv_rank), self.head_dim // 2


def parent_shape(model: nn.Module) -> HybridShape:
    """The widths of a LLaMA-like parent; CompressError for anything else (or uneven pruned widths)."""
    from compress.arch import check_llama_like, layout

    check_llama_like(model)
    lay = layout(model)
    if len(set(lay.heads)) != 1 or len(set(lay.kv_heads)) != 1:
        raise CompressError("hybridize needs the same attention heads in every layer; this model's layers differ "
                            f"(heads {sorted(set(lay.heads))}, KV heads {sorted(set(lay.kv_heads))})")
    for index, layer in enumerate(model.model.layers):
        if any(getattr(layer.self_attn, n).bias is not None for n in ("q_proj", "k_proj", "v_proj")):
            raise CompressError(f"layer {index} has q/k/v biases; hybridize supports bias-free Llama attention only")
    return HybridShape(lay.hidden, lay.heads[0], lay.kv_heads[0], lay.head_dim, lay.depth)


def parse_layers(spec, depth: int, what: str) -> list[int]:
    """Layer indices from a list or a comma-separated string ("0,10,20"); CompressError when out of range."""
    if spec is None or spec == "":
        return []
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out = []
    for item in items:
        try:
            index = int(str(item).strip())
        except ValueError:
            raise CompressError(f"{what}: '{item}' is not a layer index") from None
        if not 0 <= index < depth:
            raise CompressError(f"{what}: layer {index} is out of range (the model has layers 0..{depth - 1})")
        if index in out:
            raise CompressError(f"{what}: layer {index} is listed twice")
        out.append(index)
    return sorted(out)


def hybrid_config(parent_config, shape: HybridShape, layer_types: list[str], q_rank: int, kv_rank: int,
                  rope_dim: int) -> ZebraLlamaConfig:
    values = {k: v for k, v in parent_config.to_dict().items() if k not in _DROP_KEYS}
    values.update(head_dim=shape.head_dim, num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                  num_key_value_heads=shape.kv_heads, layer_types=list(layer_types))
    mla = "mla" in layer_types
    config = ZebraLlamaConfig(**values, q_lora_rank=q_rank if mla else None, kv_lora_rank=kv_rank if mla else None,
                              mla_rope_inv_freq=parent_frequencies(parent_config, shape.head_dim, rope_dim) if mla else None,
                              qk_rope_head_dim=rope_dim if mla else None,
                              qk_nope_head_dim=shape.head_dim - rope_dim if mla else None,
                              v_head_dim=shape.head_dim if mla else None, mamba_d_state=shape.head_dim,
                              parent_model_type=getattr(parent_config, "model_type", None))
    config.architectures = ["ZebraLlamaForCausalLM"]
    return config


def parent_frequencies(parent_config, head_dim: int, rope_dim: int) -> list[float]:
    """The parent's ``rope_dim / 2`` highest RoPE frequencies (its rotary embedding's first ones, whatever its
    RoPE type): MLA's RoPE channels rotate at exactly these."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    inv_freq = LlamaRotaryEmbedding(parent_config).inv_freq.float()
    if inv_freq.numel() != head_dim // 2 or not bool((inv_freq[1:] <= inv_freq[:-1]).all()):
        raise CompressError("hybridize needs RoPE on every channel pair (i, i + head_dim/2) at falling frequencies; "
                            f"this model's rotary embedding has {inv_freq.numel()} frequencies for head_dim {head_dim}")
    return [float(f) for f in inv_freq[: rope_dim // 2]]


def rope_permutation(head_dim: int, rope_dim: int) -> torch.Tensor:
    """Per head: the parent's channel of each MLA channel, MLA's laid out [nope ; rope]. The parent rotates its
    pairs (i, i + head_dim/2) at its i-th frequency; MLA rotates its pairs (j, j + rope_dim/2) at the parent's j-th
    (:func:`parent_frequencies`), so the parent's rope_dim/2 fastest pairs keep their rotation exactly and the
    slower ones become the position-free part (MHA2MLA's partial RoPE, highest frequencies kept)."""
    half, fast = head_dim // 2, rope_dim // 2
    slow = list(range(fast, half))
    return torch.tensor(slow + [i + half for i in slow] + list(range(fast)) + [i + half for i in range(fast)])


def check_ranks(shape: HybridShape, q_rank: int, kv_rank: int, rope_dim: int) -> None:
    for name, value, limit, why in (
            ("--q-rank", q_rank, shape.max_q_rank, f"min(heads·head_dim {shape.heads * shape.head_dim}, hidden "
                                                    f"{shape.hidden})"),
            ("--kv-rank", kv_rank, shape.max_kv_rank, f"min(2·kv_heads·head_dim "
                                                      f"{2 * shape.kv_heads * shape.head_dim}, hidden {shape.hidden})")):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= limit:
            raise CompressError(f"{name} must be in 1..{limit} ({why}), got {value}")
    if isinstance(rope_dim, bool) or not isinstance(rope_dim, int) or rope_dim <= 0 or rope_dim % 2 \
            or rope_dim >= shape.head_dim:
        raise CompressError(f"--rope-dim must be even and in 2..{shape.head_dim - 2} (below head_dim "
                            f"{shape.head_dim}), got {rope_dim}")


@torch.no_grad()
def mla_from_attention(attn: nn.Module, config: ZebraLlamaConfig, index: int) -> MLAttention:
    """An MLA mixer for layer ``index`` initialised from a Llama attention by SVD (module docstring).

    Each head's q and k channels are first reordered by :func:`rope_permutation` (when the config carries the
    parent's frequencies; hybrids configured before that keep the parent's order)."""
    w = attn.q_proj.weight
    mla = MLAttention(config, index).to(device=w.device, dtype=w.dtype)
    n_h, n_kv, d, d_nope = config.num_attention_heads, config.num_key_value_heads, config.head_dim, config.d_nope
    r_q, r_kv = config.q_lora_rank, config.kv_lora_rank
    order = rope_permutation(d, config.d_rope) if getattr(config, "mla_rope_inv_freq", None) is not None \
        else torch.arange(d)
    w_q = attn.q_proj.weight.double().view(n_h, d, -1)[:, order].reshape(n_h * d, -1)
    u, s, vh = torch.linalg.svd(w_q, full_matrices=False)
    mla.q_a_proj.weight.copy_(s[:r_q, None] * vh[:r_q])
    mla.q_b_proj.weight.copy_(u[:, :r_q])
    w_k = attn.k_proj.weight.double().view(n_kv, d, -1)[:, order]
    rope_rows = w_k[:, d_nope:].mean(0)  # (d_rope, hidden): the shared RoPE key (a query-weighted mean: no better)
    # the latent: a joint SVD of the position-free keys and the values (the RoPE rows have their own path)
    u, s, vh = torch.linalg.svd(torch.cat([w_k[:, :d_nope].reshape(n_kv * d_nope, -1), attn.v_proj.weight.double()]),
                                full_matrices=False)
    r = min(r_kv, s.numel())  # a rank above the joint matrix's: the extra latent channels start at zero
    down, up = w_k.new_zeros(r_kv, w_k.shape[-1]), w_k.new_zeros(u.shape[0], r_kv)
    down[:r], up[:, :r] = s[:r, None] * vh[:r], u[:, :r]
    mla.kv_a_proj_with_mqa.weight.copy_(torch.cat([down, rope_rows]))
    u_k, u_v = up[: n_kv * d_nope].view(n_kv, d_nope, r_kv), up[n_kv * d_nope:].view(n_kv, d, r_kv)
    mla.kv_b_proj.weight.copy_(torch.cat([u_k, u_v], dim=1).reshape(-1, r_kv))
    mla.o_proj.load_state_dict(attn.o_proj.state_dict())
    return mla


@torch.no_grad()
def mamba2_from_attention(attn: nn.Module, config: ZebraLlamaConfig, index: int,
                          fresh: Mamba2Mixer | None = None) -> Mamba2Mixer:
    """A Mamba2 mixer for layer ``index`` whose x, B, C and out weights are W_v, W_k, W_q and W_o (the rest
    fresh, or taken from ``fresh``)."""
    w = attn.q_proj.weight
    mixer = fresh if fresh is not None else Mamba2Mixer(config, index)
    mixer.to(device=w.device, dtype=w.dtype)
    parts = mixer.split_in_proj()
    parts["x"].copy_(attn.v_proj.weight)
    parts["B"].copy_(attn.k_proj.weight)
    parts["C"].copy_(attn.q_proj.weight)
    mixer.out_proj.load_state_dict(attn.o_proj.state_dict())
    return mixer


def hybridize(model: nn.Module, mla_layers=(), mamba_layers="rest", q_rank: int | None = None,
              kv_rank: int | None = None, rope_dim: int | None = None, seed: int = 0) -> ZebraLlamaForCausalLM:
    """The initialised (untrained) hybrid of a LLaMA-like ``model``: layers ``mla_layers`` become MLA,
    ``mamba_layers`` (a list, or ``"rest"``: every layer not in ``mla_layers``) Mamba2, the others keep
    attention. Ranks default to :meth:`HybridShape.default_ranks`. The parent is not changed."""
    shape = parent_shape(model)
    mla = parse_layers(mla_layers, shape.layers, "--mla-layers")
    if isinstance(mamba_layers, str) and mamba_layers.strip() == "rest":
        mamba = [i for i in range(shape.layers) if i not in mla]
    else:
        mamba = parse_layers(mamba_layers, shape.layers, "--mamba-layers")
    both = sorted(set(mla) & set(mamba))
    if both:
        raise CompressError(f"layer {both[0]} is in both --mla-layers and --mamba-layers")
    dq, dkv, drope = shape.default_ranks()
    q_rank, kv_rank, rope_dim = (dq if q_rank is None else q_rank, dkv if kv_rank is None else kv_rank,
                                 drope if rope_dim is None else rope_dim)
    if mla:
        check_ranks(shape, q_rank, kv_rank, rope_dim)
    types = ["mla" if i in mla else "mamba2" if i in mamba else "attention" for i in range(shape.layers)]
    config = hybrid_config(model.config, shape, types, q_rank, kv_rank, rope_dim)
    param = next(model.parameters())
    torch.manual_seed(seed)
    hybrid = ZebraLlamaForCausalLM(config).to(dtype=param.dtype, device=param.device).eval()
    state = {k: v for k, v in model.state_dict().items() if ".self_attn." not in k}
    missing, unexpected = hybrid.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    for index, (layer, old) in enumerate(zip(hybrid.model.layers, model.model.layers)):
        kind = types[index]
        if kind == "attention":
            layer.self_attn.load_state_dict(old.self_attn.state_dict())
        elif kind == "mla":
            layer.self_attn = mla_from_attention(old.self_attn, config, index)
        else:
            layer.self_attn = mamba2_from_attention(old.self_attn, config, index, fresh=layer.self_attn)
    hybrid.tie_weights()
    return hybrid


def fresh_mixer(config: ZebraLlamaConfig, index: int, kind: str) -> nn.Module:
    """An untrained mixer of ``kind`` for layer ``index`` (re-exported for the distillation)."""
    return build_mixer(config, index, kind)
