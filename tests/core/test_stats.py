"""HessianAccumulator against a dense float64 X Xᵀ."""

import pytest
import torch

from compress.stats import HessianAccumulator


@pytest.mark.parametrize("width", [48, 500])  # 500: the lower-block-triangle path, blocks 192/192/116
@pytest.mark.parametrize("splits", [[300], [1, 299], [100, 100, 100], [7, 64, 129, 100]])
def test_hessian_equals_dense_float64_whatever_the_batch_split(splits, width):
    x = torch.randn(sum(splits), width, generator=torch.Generator().manual_seed(0)) * 3 + 0.5
    acc = HessianAccumulator(width)
    assert (acc.block < width) == (width == 500)
    for chunk in torch.split(x, splits):
        acc.add_batch(chunk.reshape(1, -1, width))  # (1, tokens, in) like a layer input
    dense = x.double().t() @ x.double()
    rel = (acc.xtx.double() - dense).norm() / dense.norm()
    assert rel.item() <= 1e-6
    assert torch.equal(acc.xtx, acc.xtx.t())
    assert acc.count == x.shape[0]
    expected = 2 * dense / x.shape[0]
    assert ((acc.hessian().double() - expected).norm() / expected.norm()).item() <= 1e-6
    assert torch.allclose(acc.channel_norms().double(), x.double().norm(dim=0), rtol=1e-6)


def test_norm_only_accumulator_keeps_no_gram():
    acc = HessianAccumulator(8, gram=False)
    x = torch.randn(10, 8)
    acc.add_batch(x)
    assert acc.xtx is None
    assert torch.allclose(acc.channel_norms(), x.norm(dim=0), rtol=1e-6)
    with pytest.raises(RuntimeError):
        acc.hessian()


def test_width_mismatch_is_an_error():
    with pytest.raises(ValueError, match="width"):
        HessianAccumulator(8).add_batch(torch.randn(4, 9))


@pytest.mark.parametrize("gram", [True, False])
def test_mean_variance_and_centred_hessian_match_float64(gram):
    x = torch.randn(3, 50, 8, generator=torch.Generator().manual_seed(0)) * 3 + 5  # far from zero mean
    acc = HessianAccumulator(8, gram=gram)
    for batch in x:
        acc.add_batch(batch)
    flat = x.reshape(-1, 8).double()
    torch.testing.assert_close(acc.mean(), flat.mean(0), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(acc.variance(), flat.var(0, unbiased=False), rtol=1e-4, atol=1e-6)
    if gram:
        centred = flat - flat.mean(0)
        torch.testing.assert_close(acc.centered_hessian().double(), 2 * centred.T @ centred / flat.shape[0],
                                   rtol=1e-4, atol=1e-4)
