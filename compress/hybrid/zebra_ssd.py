"""The Mamba2 scan (SSD), in pure PyTorch, and the optional mamba-ssm / causal-conv1d kernels.

The recurrence, per head h with state S (head_dim P × state N), for t = 1..L::

    S_t = exp(dt_t · A_h) · S_{t−1} + dt_t · x_t ⊗ B_t        y_t = S_t · C_t   (+ D_h · x_t outside)

:func:`ssd_chunked` computes it in chunks of Q tokens (the "state space duality" form of Mamba2):
inside a chunk as a masked, decayed attention-like product, between chunks by passing the state, so
prefill and training cost O(L·Q) and memory O(L·Q) instead of a Python loop over L. :func:`ssd_step`
is the exact one-token recurrence used for decode. Groups: head h reads B and C of group
h // (heads / groups).

Self-contained (torch only; mamba-ssm and causal-conv1d are imported lazily and only on CUDA).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _segsum(a: torch.Tensor) -> torch.Tensor:
    """(…, T) → (…, T, T) with [i, j] = a[j+1] + … + a[i] for j ≤ i, −inf above the diagonal."""
    t = a.shape[-1]
    a = a[..., None].expand(*a.shape, t)  # [..., i, j] = a[i]
    below = torch.tril(torch.ones(t, t, dtype=torch.bool, device=a.device), diagonal=-1)
    a = a.masked_fill(~below, 0)
    out = torch.cumsum(a, dim=-2)
    keep = torch.tril(torch.ones(t, t, dtype=torch.bool, device=a.device), diagonal=0)
    return out.masked_fill(~keep, float("-inf"))


def _to_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """(b, L, G, N) → (b, L, H, N): head h reads group h // (H / G)."""
    groups = t.shape[2]
    return t if groups == heads else t.repeat_interleave(heads // groups, dim=2)


def ssd_chunked(x, dt, A, B, C, chunk_size: int = 64, initial_state=None):
    """The scan over a whole sequence, chunk by chunk.

    x (b, L, H, P), dt (b, L, H) (already positive), A (H,) (negative), B and C (b, L, G, N),
    initial_state (b, H, P, N) or None. Returns y (b, L, H, P) and the final state (b, H, P, N),
    computed in float32 (float64 stays float64) and returned in x's dtype / float32.
    """
    b, length, heads, p = x.shape
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    x, dt, A = x.to(work), dt.to(work), A.to(work)
    B, C = _to_heads(B.to(work), heads), _to_heads(C.to(work), heads)
    n = B.shape[-1]
    q = chunk_size
    pad = (-length) % q
    if pad:  # padded steps have dt = 0: no input, no decay, so they change neither outputs nor the state
        x, dt = F.pad(x, (0, 0, 0, 0, 0, pad)), F.pad(dt, (0, 0, 0, pad))
        B, C = F.pad(B, (0, 0, 0, 0, 0, pad)), F.pad(C, (0, 0, 0, 0, 0, pad))
    c = (length + pad) // q
    xd = (x * dt[..., None]).reshape(b, c, q, heads, p)  # dt · x
    a = (dt * A).reshape(b, c, q, heads).permute(0, 3, 1, 2)  # (b, H, c, Q): log decay per step
    B, C = B.reshape(b, c, q, heads, n), C.reshape(b, c, q, heads, n)
    a_cum = torch.cumsum(a, dim=-1)  # (b, H, c, Q)

    # 1. inside each chunk: y_l = Σ_{s ≤ l} (C_l · B_s) exp(a_{s+1} + … + a_l) dt_s x_s
    decay = torch.exp(_segsum(a))  # (b, H, c, Q, Q)
    scores = torch.einsum("bclhn,bcshn->bhcls", C, B) * decay
    y = torch.einsum("bhcls,bcshp->bclhp", scores, xd)

    # 2. the state each chunk leaves, from its own inputs only
    to_end = torch.exp(a_cum[..., -1:] - a_cum)  # (b, H, c, Q)
    states = torch.einsum("bcshn,bhcs,bcshp->bchpn", B, to_end, xd)

    # 3. pass the states from chunk to chunk (the initial state enters as chunk −1)
    if initial_state is None:
        initial_state = torch.zeros(b, heads, p, n, dtype=work, device=x.device)
    states = torch.cat([initial_state.to(work)[:, None], states], dim=1)  # (b, c+1, H, P, N)
    chunk_decay = torch.exp(_segsum(F.pad(a_cum[..., -1], (1, 0))))  # (b, H, c+1, c+1)
    states = torch.einsum("bhzc,bchpn->bzhpn", chunk_decay, states)
    entering, final = states[:, :-1], states[:, -1]

    # 4. each position reads the state that entered its chunk, decayed to it
    from_start = torch.exp(a_cum)  # (b, H, c, Q)
    y = y + torch.einsum("bclhn,bchpn,bhcl->bclhp", C, entering, from_start)
    y = y.reshape(b, c * q, heads, p)[:, :length]
    return y, final


def ssd_step(state, x, dt, A, B, C):
    """One token of the recurrence. state (b, H, P, N); x (b, H, P); dt (b, H); A (H,); B, C (b, G, N).
    Returns y (b, H, P) and the new state (float32, or float64 for float64 inputs)."""
    heads = x.shape[1]
    work = state.dtype
    B = _to_heads(B.to(work)[:, None], heads)[:, 0]
    C = _to_heads(C.to(work)[:, None], heads)[:, 0]
    dt, x = dt.to(work), x.to(work)
    decay = torch.exp(dt * A.to(work))  # (b, H)
    state = state * decay[..., None, None] + (dt[..., None] * x)[..., None] * B[:, :, None, :]
    y = torch.einsum("bhpn,bhn->bhp", state, C)
    return y, state


def causal_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, left: torch.Tensor | None = None):
    """Depthwise causal convolution. x (b, C, L); weight (C, K); ``left`` (b, C, K−1): the inputs before
    x (the conv state), zeros when None. Returns (b, C, L)."""
    k = weight.shape[-1]
    if left is None:
        x_full = F.pad(x, (k - 1, 0))
    else:
        x_full = torch.cat([left.to(x.dtype), x], dim=-1)
    return F.conv1d(x_full, weight[:, None, :].to(x.dtype), None if bias is None else bias.to(x.dtype),
                    groups=x.shape[1])


_KERNELS: dict = {}


def kernels():
    """(causal_conv1d_fn, mamba_chunk_scan_combined) when CUDA is present and both packages import,
    else None. Looked up once."""
    if "value" not in _KERNELS:
        found = None
        if torch.cuda.is_available():
            try:
                from causal_conv1d import causal_conv1d_fn
                from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

                found = (causal_conv1d_fn, mamba_chunk_scan_combined)
            except Exception:  # an optional extra: any import failure means the PyTorch path
                found = None
        _KERNELS["value"] = found
    return _KERNELS["value"]


def kernel_conv(xbc, weight, bias):
    """causal-conv1d with SiLU on (b, C, L); the kernel of :func:`kernels`."""
    conv_fn, _ = kernels()
    return conv_fn(xbc.contiguous(), weight.to(xbc.dtype), None if bias is None else bias.to(xbc.dtype),
                   activation="silu")


def kernel_scan(x, dt, A, B, C, chunk_size, initial_state=None):
    """mamba-ssm's fused chunked scan with the same arguments and results as :func:`ssd_chunked`."""
    _, scan = kernels()
    y, final = scan(x.float().contiguous(), dt.float().contiguous(), A.float(), B.float().contiguous(),
                    C.float().contiguous(), chunk_size, initial_states=initial_state, return_final_states=True)
    return y, final.float()
