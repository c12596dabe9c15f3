"""The Mamba2 mixer of a hybrid, shaped so that it can start from a Llama attention (MambaInLlama).

Widths (expand 1): heads H = the attention's query heads, head_dim P = the attention's head_dim,
state N = head_dim, KV heads K. ``in_proj`` writes, in this order::

    z (H·P, the gate) | x (K·P) | B (K·N) | C (H·N) | dt (H)

so that x, B and C can start as W_v, W_k and W_q. The depthwise causal convolution (kernel d_conv)
runs over x|B|C, then SiLU; x and B are repeated from K to H heads (head h reads KV head h // (H/K),
as grouped-query attention does). The scan (:mod:`zebra_ssd`) gives y; then y + D·x, the gated
RMSNorm ``norm(y · silu(z))`` over each head's P channels separately (the gate before the norm, as
mamba-ssm does), and ``out_proj`` (which can start as W_o).

Decode keeps the last d_conv − 1 inputs of the convolution and the SSM state (b, H, P, N) in
float32 (the convolution and the scan run in float32 on both paths); prefill with a cache fills them. On CUDA with mamba-ssm and causal-conv1d installed (and
``config.mamba_use_kernels``), prefill runs their kernels.

Self-contained (imports only torch, transformers and its sibling files).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .zebra_ssd import causal_conv, kernel_conv, kernel_scan, kernels, ssd_chunked, ssd_step


class GatedRMSNorm(nn.Module):
    """RMSNorm of x · silu(z), over groups of ``group_size`` channels, times a learned weight."""

    def __init__(self, width: int, group_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.group_size, self.variance_epsilon = group_size, eps

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float() * F.silu(z.float())
        shape = x.shape
        x = x.view(*shape[:-1], -1, self.group_size)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return (self.weight.float() * x.view(shape)).to(dtype)


class Mamba2Mixer(nn.Module):
    """Mamba2 with the widths of a Llama attention (see the module docstring)."""

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim, self.d_state = config.head_dim, config.d_state
        self.d_conv, self.chunk_size = config.mamba_d_conv, config.mamba_chunk_size
        self.use_kernels = bool(config.mamba_use_kernels)
        self.d_inner = config.mamba_expand * self.heads * self.head_dim
        self.x_width, self.b_width = self.kv_heads * self.head_dim, self.kv_heads * self.d_state
        self.c_width = self.heads * self.d_state
        self.conv_dim = self.x_width + self.b_width + self.c_width
        hidden = config.hidden_size
        self.in_proj = nn.Linear(hidden, self.d_inner + self.conv_dim + self.heads, bias=False)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, self.d_conv, groups=self.conv_dim,
                                padding=self.d_conv - 1, bias=True)
        self.dt_bias = nn.Parameter(torch.zeros(self.heads))
        self.A_log = nn.Parameter(torch.zeros(self.heads))
        self.D = nn.Parameter(torch.ones(self.heads))
        self.norm = GatedRMSNorm(self.d_inner, self.head_dim, eps=config.rms_norm_eps)
        self.out_proj = nn.Linear(self.d_inner, hidden, bias=bool(getattr(config, "attention_bias", False)))
        self.dt_range = (config.mamba_dt_min, config.mamba_dt_max, config.mamba_dt_init_floor)
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self, generator: torch.Generator | None = None) -> None:
        """Mamba2's own initialisation of A_log ~ log U(1, 16), dt_bias = softplus⁻¹(dt) with
        dt ~ log U(dt_min, dt_max) (floored), D = 1, norm weight = 1."""
        dt_min, dt_max, floor = self.dt_range
        device = self.A_log.device
        if device.type == "meta":
            return
        u = torch.rand(self.heads, generator=generator, device=device)
        dt = torch.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=floor)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        a = torch.empty(self.heads, device=device).uniform_(1, 16, generator=generator)
        self.A_log.copy_(torch.log(a))
        self.D.fill_(1.0)
        self.norm.weight.fill_(1.0)

    def split_in_proj(self) -> dict[str, torch.Tensor]:
        """Views of the in_proj rows: z, x, B, C, dt (for initialisation and checks)."""
        sizes = [self.d_inner, self.x_width, self.b_width, self.c_width, self.heads]
        return dict(zip(("z", "x", "B", "C", "dt"), self.in_proj.weight.split(sizes, dim=0)))

    def _split_xbc(self, xbc):
        b, length = xbc.shape[:2]
        x, B, C = xbc.split([self.x_width, self.b_width, self.c_width], dim=-1)
        groups = self.heads // self.kv_heads
        x = x.reshape(b, length, self.kv_heads, self.head_dim).repeat_interleave(groups, dim=2)
        return x, B.reshape(b, length, self.kv_heads, self.d_state), C.reshape(b, length, self.heads, self.d_state)

    def forward(self, hidden_states, attention_mask=None, cache=None, **kwargs):
        pad = None
        if attention_mask is not None and attention_mask.dim() == 2 and not bool(attention_mask.all()):
            pad = attention_mask[:, -hidden_states.shape[1]:, None].to(hidden_states.dtype)
            hidden_states = hidden_states * pad
        b, length, _ = hidden_states.shape
        z, xbc, dt = self.in_proj(hidden_states).split([self.d_inner, self.conv_dim, self.heads], dim=-1)
        conv_state, ssm_state = cache.mamba_state(self.layer_idx) if cache is not None else (None, None)
        A = -torch.exp(self.A_log.float())
        dt = F.softplus(dt.float() + self.dt_bias.float())  # (b, L, H)
        if conv_state is not None and length == 1:
            y, conv_state, ssm_state = self._step(xbc[:, 0], dt[:, 0], A, conv_state, ssm_state)
            y = y[:, None]
        else:
            y, conv_state, ssm_state = self._scan(xbc, dt, A, conv_state, ssm_state, pad)
        if cache is not None:
            cache.set_mamba_state(self.layer_idx, conv_state, ssm_state)
        y = self.norm(y.reshape(b, length, self.d_inner).to(hidden_states.dtype), z)
        return self.out_proj(y), None

    def _kernel_path(self, xbc, left) -> bool:
        return self.use_kernels and left is None and xbc.is_cuda and kernels() is not None

    def _scan(self, xbc, dt, A, conv_state, ssm_state, pad):
        """A whole chunk of tokens: convolution, scan, D skip. Returns y (b, L, H, P) and the new states."""
        raw = xbc.transpose(1, 2).float()  # (b, C, L); conv and scan in float32 on both paths
        keep = self.d_conv - 1
        left = conv_state
        history = raw if left is None else torch.cat([left.to(raw.dtype), raw], dim=-1)
        new_conv = F.pad(history, (max(0, keep - history.shape[-1]), 0))[..., -keep:]
        kernel = self._kernel_path(xbc, left)
        if kernel:
            xbc = kernel_conv(raw, self.conv1d.weight[:, 0], self.conv1d.bias).transpose(1, 2)
        else:
            xbc = F.silu(causal_conv(raw, self.conv1d.weight[:, 0], self.conv1d.bias, left)).transpose(1, 2)
        if pad is not None:
            xbc = xbc * pad
        x, B, C = self._split_xbc(xbc)
        if kernel:
            groups = self.heads // self.kv_heads
            B = B.repeat_interleave(groups, dim=2)
            y, state = kernel_scan(x, dt.to(x.dtype), A, B, C, self.chunk_size, ssm_state)
        else:
            y, state = ssd_chunked(x, dt, A, B, C, self.chunk_size, ssm_state)
        y = y.float() + self.D.float()[:, None] * x.float()
        return y, new_conv, state

    def _step(self, xbc, dt, A, conv_state, ssm_state):
        """One token: the convolution over the kept inputs and the exact recurrence."""
        history = torch.cat([conv_state, xbc.float()[..., None]], dim=-1)  # (b, C, K), float32
        out = (history * self.conv1d.weight[:, 0].float()).sum(-1)
        if self.conv1d.bias is not None:
            out = out + self.conv1d.bias.float()
        x, B, C = self._split_xbc(F.silu(out)[:, None])
        y, state = ssd_step(ssm_state, x[:, 0], dt, A, B[:, 0], C[:, 0])
        y = y + self.D.float()[:, None] * x[:, 0].float()
        return y, history[..., 1:], state

    def kv_values_per_token(self) -> int:
        """Nothing grows with the sequence: the state is constant (see :meth:`state_bytes`)."""
        return 0

    def state_bytes(self, batch: int = 1, dtype_bytes: int = 4) -> int:
        """Bytes of this mixer's decode state per sequence: the last d_conv − 1 conv inputs and the SSM state,
        both kept in float32 whatever the weights' dtype (``dtype_bytes`` is accepted for the cost API)."""
        return batch * 4 * (self.conv_dim * (self.d_conv - 1) + self.heads * self.head_dim * self.d_state)
