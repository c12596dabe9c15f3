"""The mamba-ssm / causal-conv1d kernel path against the pure-PyTorch path (needs CUDA and the optional kernels)."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.hybrid import tiny_hybrid

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@torch.no_grad()
def test_kernel_scan_equals_the_pytorch_scan_in_bf16():
    """bf16 weights and activations; the convolution and the scan both run in float32 on both paths, so their
    outputs (float32) agree within 1e-3 of their scale, and the bf16 logits within bf16 rounding."""
    pytest.importorskip("mamba_ssm")
    pytest.importorskip("causal_conv1d")
    from compress.hybrid.zebra_ssd import kernels

    assert kernels() is not None
    model = tiny_hybrid(["mamba2", "mamba2"], chunk=16).cuda().to(torch.bfloat16)
    mixer = model.model.layers[0].self_attn
    hidden = torch.randn(2, 50, 64, device="cuda", dtype=torch.bfloat16)
    xbc, dt = mixer.in_proj(hidden).split([mixer.d_inner, mixer.conv_dim, mixer.heads], dim=-1)[1:]
    A = -torch.exp(mixer.A_log.float())
    dt = torch.nn.functional.softplus(dt.float() + mixer.dt_bias.float())
    outputs = {}
    for use in (True, False):
        mixer.use_kernels = use
        outputs[use] = mixer._scan(xbc, dt, A, None, None, None)
    (y_fast, conv_fast, s_fast), (y_ref, conv_ref, s_ref) = outputs[True], outputs[False]
    assert (y_fast - y_ref).abs().max() <= 1e-3 * y_ref.abs().max()
    assert (s_fast - s_ref).abs().max() <= 1e-3 * s_ref.abs().max() and torch.equal(conv_fast, conv_ref)
    ids = torch.randint(0, 128, (2, 40), device="cuda")
    logits = {}
    for use in (True, False):
        for layer in model.model.layers:
            layer.self_attn.use_kernels = use
        logits[use] = model(input_ids=ids, use_cache=False).logits.float()
    assert (logits[True] - logits[False]).abs().max() <= 2e-2 * logits[False].abs().max()
