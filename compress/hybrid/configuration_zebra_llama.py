"""The config of a Zebra-Llama hybrid: a Llama whose decoder layers each have their own token mixer.

``layer_types`` lists, per layer, ``attention`` (the parent's attention, kept), ``mla`` (multi-head
latent attention, DeepSeek-V3 style) or ``mamba2`` (a Mamba2 state-space mixer). The MLA dimensions
keep DeepSeek's names: ``q_lora_rank`` (r_q), ``kv_lora_rank`` (r_kv), ``qk_rope_head_dim`` (d_rope),
``qk_nope_head_dim`` (head_dim − d_rope) and ``v_head_dim`` (head_dim); the Mamba2 ones are
``mamba_d_state`` (= head_dim), ``mamba_d_conv`` (4), ``mamba_chunk_size``, ``mamba_expand`` (1, the
inner width is heads · head_dim) and the dt initialisation range.

Self-contained (imports only torch, transformers and its sibling files): it is saved beside a hybrid
checkpoint so that ``from_pretrained(..., trust_remote_code=True)`` reloads it.
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import LlamaConfig

MODEL_TYPE = "zebra_llama"
MIXERS = ("attention", "mla", "mamba2")


@strict
class ZebraLlamaConfig(LlamaConfig):
    """LlamaConfig plus one mixer per layer and the MLA / Mamba2 dimensions."""

    model_type = "zebra_llama"
    layer_types: list[str] | None = None  # per layer: attention | mla | mamba2 (None: all attention)
    q_lora_rank: int | None = None  # r_q
    kv_lora_rank: int | None = None  # r_kv
    qk_rope_head_dim: int | None = None  # d_rope
    qk_nope_head_dim: int | None = None  # head_dim − d_rope
    v_head_dim: int | None = None  # head_dim
    # the MLA RoPE's d_rope/2 frequencies: the parent's highest ones (compress.hybrid.build.hybrid_config), so
    # the parent's rotation carries over exactly; None (hybrids built before it): theta^(-2j/d_rope)
    mla_rope_inv_freq: list[float] | None = None
    mamba_d_state: int | None = None  # default: head_dim
    mamba_d_conv: int = 4
    mamba_expand: int = 1
    mamba_chunk_size: int = 64
    mamba_dt_min: float = 0.001
    mamba_dt_max: float = 0.1
    mamba_dt_init_floor: float = 1e-4
    mamba_use_kernels: bool = True  # the mamba-ssm / causal-conv1d kernels on CUDA when they import
    parent_model_type: str | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.layer_types = self._own_types(self.layer_types)

    def _own_types(self, types):
        if types is None:
            return ["attention"] * self.num_hidden_layers
        # transformers renames the legacy layer type "attention" to "full_attention"; this config keeps its own
        return ["attention" if t == "full_attention" else t for t in types]

    def validate_layer_type(self):
        types = self._own_types(self.layer_types)
        bad = [t for t in types if t not in MIXERS]
        if bad:
            raise ValueError(f"layer_types entries must be in {MIXERS}, got {bad[0]!r}")
        if len(types) != self.num_hidden_layers:
            raise ValueError(f"layer_types has {len(types)} entries for {self.num_hidden_layers} layers")

    def validate_architecture(self):
        head_dim = self.head_dim
        if "mla" in self._own_types(self.layer_types):
            for name in ("q_lora_rank", "kv_lora_rank", "qk_rope_head_dim"):
                if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                    raise ValueError(f"an MLA layer needs a positive {name}")
            if self.qk_rope_head_dim % 2 or self.qk_rope_head_dim >= head_dim:
                raise ValueError(f"qk_rope_head_dim must be even and below head_dim {head_dim}")
            freqs = self.mla_rope_inv_freq
            if freqs is not None and len(freqs) != self.qk_rope_head_dim // 2:
                raise ValueError(f"mla_rope_inv_freq needs qk_rope_head_dim / 2 = {self.qk_rope_head_dim // 2} "
                                 f"frequencies, got {len(freqs)}")

    def mixer(self, index: int) -> str:
        return self._own_types(self.layer_types)[index]

    @property
    def d_rope(self) -> int:
        return int(self.qk_rope_head_dim or 0)

    @property
    def d_nope(self) -> int:
        return self.head_dim - self.d_rope

    @property
    def d_state(self) -> int:
        return int(self.mamba_d_state or self.head_dim)


__all__ = ["ZebraLlamaConfig"]
