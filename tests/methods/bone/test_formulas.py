"""peft's MiSS forward passes against the Bone paper's formulas, written here in float64.

Bone/MiSS default form: one block B (r x out) shared by the input blocks, ΔW[:, b*r:(b+1)*r] = Bᵀ
(the last, ragged block takes Bᵀ's first in mod r columns). Bat ("Weight Guide", the paper's Eq. for
ΔW): per output block a and input block b, ΔW_ab = W_ab B_a + B_a.
"""

import pytest
import torch

from compress.errors import CompressError
from compress.methods.bone.adapter import attach_adapter, peft_config

TOL = 1e-10  # float64 throughout: differences are round-off only


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is faster on a shared CPU


class Toy(torch.nn.Module):
    def __init__(self, n_in, n_out):
        super().__init__()
        self.q_proj = torch.nn.Linear(n_in, n_out, bias=True, dtype=torch.float64)

    def forward(self, x):
        return self.q_proj(x)


def wrapped(method, n_in, n_out, r, seed):
    from peft import get_peft_model

    torch.manual_seed(seed)
    toy = Toy(n_in, n_out)
    W, bias = toy.q_proj.weight.detach().clone(), toy.q_proj.bias.detach().clone()
    config = peft_config(method, r, ["q_proj"])
    config.task_type = None  # a bare module, not a causal LM
    model = get_peft_model(toy, config)
    layer = model.base_model.model.q_proj
    block = layer.miss_block["default"]
    with torch.no_grad():
        block.copy_(torch.randn(block.shape, dtype=torch.float64) * 0.1)
    return model, W, bias, block.detach().clone()


def bone_reference(W, B):
    """W + ΔW with ΔW = [Bᵀ Bᵀ ... Bᵀ[:, :in mod r]] (B is r x out)."""
    n_out, n_in = W.shape
    r = B.shape[0]
    delta = torch.zeros_like(W)
    for start in range(0, n_in, r):
        width = min(r, n_in - start)
        delta[:, start:start + width] = B.T[:, :width]
    return W + delta


def bat_reference(W, B):
    """W + ΔW with ΔW_ab = W_ab B_a + B_a on r x r blocks (B is out/r x r x r)."""
    n_out, n_in = W.shape
    r = B.shape[-1]
    out = W.clone()
    for a in range(n_out // r):
        for b in range(n_in // r):
            W_ab = W[a * r:(a + 1) * r, b * r:(b + 1) * r]
            out[a * r:(a + 1) * r, b * r:(b + 1) * r] = W_ab + W_ab @ B[a] + B[a]
    return out


@pytest.mark.parametrize("n_in,n_out,r", [(64, 32, 8), (48, 96, 16), (24, 24, 24), (50, 30, 8), (20, 12, 7)])
def test_bone_forward_matches_formula(n_in, n_out, r):
    model, W, bias, B = wrapped("bone", n_in, n_out, r, seed=n_in + r)
    assert B.shape == (r, n_out)
    x = torch.randn(3, 5, n_in, dtype=torch.float64)
    expected = x @ bone_reference(W, B).T + bias
    assert torch.allclose(model(x), expected, atol=TOL, rtol=0)


@pytest.mark.parametrize("n_in,n_out,r", [(64, 32, 8), (48, 96, 16), (24, 24, 24), (32, 64, 4)])
def test_bat_forward_matches_formula(n_in, n_out, r):
    model, W, bias, B = wrapped("bat", n_in, n_out, r, seed=n_in + r)
    assert B.shape == (n_out // r, r, r)
    x = torch.randn(3, 5, n_in, dtype=torch.float64)
    expected = x @ bat_reference(W, B).T + bias
    assert torch.allclose(model(x), expected, atol=TOL, rtol=0)


@pytest.mark.parametrize("method,n_in,n_out,r", [("bone", 64, 32, 8), ("bone", 50, 30, 8), ("bat", 48, 96, 16)])
def test_merge_and_unmerge_match_formula(method, n_in, n_out, r):
    model, W, bias, B = wrapped(method, n_in, n_out, r, seed=7)
    reference = bone_reference(W, B) if method == "bone" else bat_reference(W, B)
    layer = model.base_model.model.q_proj
    layer.merge()
    assert torch.allclose(layer.base_layer.weight, reference, atol=TOL, rtol=0)
    layer.unmerge()  # Bat's unmerge inverts (I + B_a): W = (W' - B_a)(I + B_a)⁻¹
    # peft computes that inverse in float32 even for float64 weights: round-off ~5e-8 measured.
    assert torch.allclose(layer.base_layer.weight, W, atol=1e-6, rtol=0)


@pytest.mark.parametrize("method", ["bone", "bat", "lora"])
def test_fresh_adapter_leaves_logits_unchanged(method):
    from tests.helpers.adapt import tiny_llama

    model = tiny_llama()
    ids = torch.randint(0, 49152, (2, 9))
    before = model(ids).logits
    peft_model = attach_adapter(model, method, 8)
    assert torch.allclose(peft_model(ids).logits, before, atol=1e-6, rtol=0)


def test_r_larger_than_the_width_is_an_error():
    from tests.helpers.adapt import tiny_llama

    with pytest.raises(CompressError, match="larger than the input width 32"):
        attach_adapter(tiny_llama(), "bone", 64)  # hidden 32: q_proj is 32 wide
    with pytest.raises(CompressError, match="larger than the width"):
        attach_adapter(tiny_llama(), "lora", 33)


def test_bat_r_not_dividing_the_width_is_an_error():
    from tests.helpers.adapt import tiny_llama

    # k_proj is 16 x 32, FFN 64: r=12 divides none of them cleanly.
    with pytest.raises(CompressError, match=r"does not divide .* blocks; .* \(divisors of 16 fit\)"):
        attach_adapter(tiny_llama(), "bat", 12)
