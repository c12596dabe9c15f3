"""GPTQ against round-to-nearest on one layer, act-order as defined, dampening retries, stacking."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from compress.plugin import build_method, make_config
from compress.methods.quantize.config import GPTQConfig, RTNConfig
from compress.methods.quantize.gptq import GPTQ, inverse_hessian_factor
from compress.methods.quantize.grid import group_grids, quantize_codes, rtn_quantize
from compress.walk import walk
from tests.helpers import make_tiny_llama


def correlated_inputs(n=1024, width=64, seed=0):
    """Inputs with correlated channels and unequal scales, like a real layer's (n, width)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(width, width, generator=g) / width ** 0.5 + torch.eye(width)
    scales = torch.logspace(-1, 1, width)[torch.randperm(width, generator=g)]
    return (torch.randn(n, width, generator=g) @ mix) * scales


def output_error64(w, w_hat, x):
    """‖W Xᵀ − Ŵ Xᵀ‖² in float64 (the reference, computed from the inputs themselves)."""
    return ((w.double() - w_hat.double()) @ x.double().t()).pow(2).sum().item()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_output_error_below_rtn_at_every_width(bits, act_order):
    """Default settings (static groups), with and without act-order, on inputs whose channel scales
    span 100×; the float64 reference error is computed from the inputs, not from the Hessian."""
    torch.manual_seed(0)
    w = torch.randn(48, 64) * 0.05
    x = correlated_inputs()
    h = 2.0 / x.shape[0] * x.t() @ x
    cfg = dict(bits=bits, group_size=16, clip_search=False)
    rtn = rtn_quantize(w, RTNConfig(**cfg)).dequantize()
    gptq, _ = GPTQ(w, h).quantize(GPTQConfig(act_order=act_order, **cfg))
    e_rtn, e_gptq = output_error64(w, rtn, x), output_error64(w, gptq.dequantize(), x)
    assert e_gptq < 0.9 * e_rtn, (bits, e_gptq, e_rtn)


def test_act_order_quantizes_columns_by_descending_hessian_diagonal():
    torch.manual_seed(1)
    w = torch.randn(16, 32) * 0.1
    x = correlated_inputs(512, 32, seed=3)
    h = 2.0 / x.shape[0] * x.t() @ x
    cfg = GPTQConfig(bits=3, group_size=8, act_order=True, clip_search=False)
    params, info = GPTQ(w, h).quantize(cfg)
    diag = h.diagonal().tolist()
    expected = sorted(range(32), key=lambda j: -diag[j])  # the definition, independently of torch.argsort
    assert info["perm"].tolist() == expected
    # The first column in that order receives no error feedback: its codes are plain rounding on the
    # static grid of its group; the same column is not the first without act-order.
    first = expected[0]
    scale, zero = group_grids(w, 3, 8, True, clip_search=False)
    g = first // 8
    rounded = quantize_codes(w[:, first], scale[:, g], zero[:, g], 3)
    assert torch.equal(params.codes[:, first].float(), rounded)
    assert params.g_idx.tolist() == [j // 8 for j in range(32)]  # static groups
    plain, _ = GPTQ(w, h).quantize(GPTQConfig(bits=3, group_size=8, clip_search=False))
    assert not torch.equal(plain.codes, params.codes)


def test_failed_cholesky_retries_with_more_dampening():
    h = torch.eye(8)
    h[0, 0] = -0.05  # indefinite: λ = 0.01·mean(diag) is not enough, 10× is
    _, damp = inverse_hessian_factor(h, 0.01, retries=4)
    assert damp == pytest.approx(0.1)


def test_gptq_method_never_writes_nan_weights():
    """A Hessian no dampening can fix (NaN) falls back to round-to-nearest, with finite weights."""
    model = make_tiny_llama()
    tokens = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    method = build_method("gptq", {"bits": 4, "group_size": 32, "damp_retries": 1})

    class Poisoned:
        def __init__(self, inner):
            self.inner = inner

        def hessian(self):
            return torch.full_like(self.inner.hessian(), float("nan"))

    original_apply = method.apply
    method.apply = lambda ctx: original_apply(dataclasses.replace(ctx, stats={k: Poisoned(v) for k, v in ctx.stats.items()}))
    result = walk(model, tokens, [method])
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert result.records[0]["gptq"]["self_attn.q_proj"]["fallback"] == "rtn"


def test_gptq_stacks_after_another_layer_method_in_one_walk():
    """RTN on attention then GPTQ on the MLP in one walk equals the two walks one after the other:
    the MLP's Hessians are observed with the layer's attention already quantized."""
    tokens = torch.randint(0, 128, (6, 24), generator=torch.Generator().manual_seed(1))
    rtn = {"bits": 3, "group_size": 32, "ignore": ["re:.*mlp\\..*"]}
    gptq = {"bits": 3, "group_size": 32, "ignore": ["re:.*self_attn\\..*"]}
    stacked = make_tiny_llama()
    result = walk(stacked, tokens, [build_method("rtn", rtn), build_method("gptq", gptq)], batch_size=4)
    assert set(result.records[0]) == {"layer", "rtn", "gptq"}
    sequential = make_tiny_llama()
    walk(sequential, tokens, [build_method("rtn", rtn)], batch_size=4)
    walk(sequential, tokens, [build_method("gptq", gptq)], batch_size=4)
    for (name, a), b in zip(stacked.named_parameters(), sequential.parameters()):
        assert (a - b).abs().max().item() <= 1e-6, name
    original = make_tiny_llama().model.layers[1].self_attn.q_proj.weight
    expected = rtn_quantize(original, make_config(RTNConfig, rtn)).dequantize()
    assert torch.equal(stacked.model.layers[1].self_attn.q_proj.weight, expected)
    assert stacked.model.layers[1].mlp.down_proj.quant_params.bits == 3


def test_sequential_groups_follow_gptq_order():
    method = build_method("gptq", {"bits": 4, "group_size": 32})
    layer = make_tiny_llama().model.layers[0]
    assert [g.modules for g in method.groups(layer, 0)] == [
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
        ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]


@pytest.mark.parametrize("act_order", [False, True])
def test_stacked_rows_quantize_as_each_matrix_alone(act_order):
    """q/k/v (and gate/up) share one Hessian and are quantized as one stacked matrix: GPTQ treats rows
    independently given H, so each block of rows gets the codes and grid it gets on its own."""
    torch.manual_seed(2)
    x = correlated_inputs(512, 64, seed=5)
    h = 2.0 / x.shape[0] * x.t() @ x
    parts = [torch.randn(rows, 64) * 0.05 for rows in (32, 16, 16)]
    cfg = GPTQConfig(bits=3, group_size=16, act_order=act_order)
    stacked, _ = GPTQ(torch.cat(parts), h).quantize(cfg)
    start = 0
    for part in parts:
        alone, _ = GPTQ(part, h).quantize(cfg)
        rows = stacked.rows(start, start + part.shape[0])
        assert torch.equal(rows.codes, alone.codes) and torch.equal(rows.scale, alone.scale)
        assert torch.equal(rows.zero, alone.zero) and torch.equal(rows.g_idx, alone.g_idx)
        start += part.shape[0]
