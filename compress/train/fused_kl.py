"""KL(teacher ‖ student) over the full vocabulary without a batch's full logits (what KD trains on).

A batch of N scored positions has N × V logits per model: 4096 positions of a 49152-token vocabulary are
805 MB per float32 tensor, and the plain computation keeps about ten such tensors alive (both models'
logits and log-softmaxes, the KL terms, their gradients): on a 24 GB CPU box the end-to-end KD of
smollm2-135m at 8 × 512 tokens was killed for memory. Here the language-model head is applied one chunk
of positions at a time, inside one autograd function:

    loss     = T² · Σ_rows Σ_v p(v) (log p(v) − log q(v)),   p = softmax(z_t / T), q = softmax(z_s / T)
    ∂loss/∂z_s = T · (q − p)          (per row; z_s = h W_sᵀ + b_s the student's logits)
    ∂loss/∂h   = T · (q − p) W_s,   ∂loss/∂W_s = T · (q − p)ᵀ h,   ∂loss/∂b_s = T · Σ_rows (q − p)

The gradients are computed in the forward, chunk by chunk, in float32 (as Liger-Kernel's fused linear
losses), and kept: memory is the student's hidden states and their gradient (N × H), the head's gradient
(V × H) and a few (chunk × V) blocks, never N × V. The teacher's logits come from its last hidden states
and head the same way (or, for a teacher whose head is not a plain linear layer, from its full logits).

:func:`student_hidden` runs the student's own forward (through a DDP wrapper, so gradients are still
synchronised) with its head swapped for the identity, so the "logits" it returns are the head's inputs.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

CHUNK_ELEMENTS = 1 << 24  # positions × vocabulary per chunk: 64 MB per float32 block


def _logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return F.linear(hidden.float(), weight.float(), None if bias is None else bias.float())


class LinearKL(torch.autograd.Function):
    """``loss = LinearKL.apply(h, W, b, teacher, T, chunk)``; ``teacher`` is ``(h_t, W_t, b_t)`` or the
    teacher's (N, V) logits. Gradients flow to h, W and b (b may be None)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, teacher, temperature: float, chunk: int):
        grad_hidden = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        grad_bias = None if bias is None else torch.zeros(bias.shape, dtype=torch.float32, device=bias.device)
        total = torch.zeros((), dtype=torch.float64, device=hidden.device)
        t = float(temperature)
        with torch.autocast(device_type=hidden.device.type, enabled=False):  # float32 even inside bf16 autocast
            LinearKL._chunks(hidden, weight, bias, teacher, t, chunk, grad_hidden, grad_weight, grad_bias, total)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        return (total * (t * t)).float()

    @staticmethod
    def _chunks(hidden, weight, bias, teacher, t, chunk, grad_hidden, grad_weight, grad_bias, total) -> None:
        n = hidden.shape[0]
        for start in range(0, n, chunk):
            stop = min(start + chunk, n)
            h = hidden[start:stop].float()
            log_q = F.log_softmax(_logits(h, weight, bias) / t, dim=-1)
            z_t = teacher[start:stop].float() if torch.is_tensor(teacher) else _logits(teacher[0][start:stop],
                                                                                      *teacher[1:])
            log_p = F.log_softmax(z_t / t, dim=-1)
            p = log_p.exp()
            total += (p * (log_p - log_q)).sum().double()
            g = (log_q.exp() - p) * t  # ∂loss/∂z_s, the T² of the loss times the 1/T of z_s / T
            grad_hidden[start:stop] = g @ weight.float()
            grad_weight += g.T @ h
            if grad_bias is not None:
                grad_bias += g.sum(dim=0)
            del log_q, log_p, p, g, z_t

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        dh, dw, db = ctx.dtypes
        scale = grad_output.float()
        return ((grad_hidden * scale).to(dh) if ctx.needs_input_grad[0] else None,
                (grad_weight * scale).to(dw) if ctx.needs_input_grad[1] else None,
                (grad_bias * scale).to(db) if grad_bias is not None and ctx.needs_input_grad[2] else None,
                None, None, None)


def linear_kl(hidden: torch.Tensor, head: nn.Linear, teacher, temperature: float = 1.0,
              chunk: int | None = None) -> torch.Tensor:
    """T² · Σ_rows KL(softmax(teacher / T) ‖ softmax(head(hidden) / T)) (module docstring), float32;
    ``hidden`` (N, H), ``teacher`` the (N, V) logits or ``(h_t, head_t)`` (the teacher's hidden states and
    head)."""
    if not torch.is_tensor(teacher):
        hidden_t, head_t = teacher
        teacher = (hidden_t.detach(), head_t.weight.detach(), None if head_t.bias is None else head_t.bias.detach())
    else:
        teacher = teacher.detach()
    chunk = chunk or max(1, CHUNK_ELEMENTS // head.weight.shape[0])
    return LinearKL.apply(hidden, head.weight, head.bias, teacher, temperature, chunk)


@contextlib.contextmanager
def _identity_head(model: nn.Module):
    head = model.lm_head
    model.lm_head = nn.Identity()
    try:
        yield head
    finally:
        model.lm_head = head


def student_hidden(model: nn.Module, batch: dict) -> tuple[torch.Tensor, nn.Linear] | None:
    """The student's last hidden states (b, T, H) from its own forward and its head, or None when its
    logits are not exactly ``lm_head(last hidden state)`` with a plain linear head."""
    from compress.metrics.logits import plain_head

    inner = getattr(model, "module", model)  # DDP wraps the model under accelerate launch
    if plain_head(inner) is None or getattr(inner, "lm_head", None) is not inner.get_output_embeddings():
        return None
    with _identity_head(inner) as head:
        hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return hidden, head
