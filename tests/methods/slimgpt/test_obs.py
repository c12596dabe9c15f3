"""SlimGPT's OBS head and channel removal against direct float64 least squares."""

from __future__ import annotations

import itertools

import pytest
import torch

from compress.methods.slimgpt.obs import dynamic_group_sizes, prune_channels, prune_column_groups

TOL = 1e-9  # relative, float64


def _problem(out=5, heads=4, head_dim=3, tokens=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    n_in = heads * head_dim
    mix = torch.randn(n_in, n_in, generator=g, dtype=torch.float64)  # correlated inputs
    X = mix @ torch.randn(n_in, tokens, generator=g, dtype=torch.float64)  # (in, N)
    W = torch.randn(out, n_in, generator=g, dtype=torch.float64)
    H = 2 * X @ X.T / tokens
    return W, X, H


def _direct_error(W, W_hat, X) -> float:
    return float((W @ X - W_hat @ X).pow(2).sum())


def _least_squares(W, X, kept_cols):
    """The best Ŵ using only ``kept_cols``: argmin ‖W X − B X_R‖² (independent of OBS)."""
    XR = X[kept_cols]  # (r, N)
    B = torch.linalg.lstsq(XR.T, (W @ X).T).solution.T  # (out, r)
    W_hat = torch.zeros_like(W)
    W_hat[:, kept_cols] = B
    return W_hat


def _cols(heads, head_dim):
    return [h * head_dim + j for h in heads for j in range(head_dim)]


def test_greedy_error_equals_direct_reconstruction_error():
    W, X, H = _problem()
    result = prune_column_groups(W, H, group_size=3, n_remove=2, damping=0.0)
    direct = _direct_error(W, result.weight, X)
    # ΔE is in units of H = 2XXᵀ/N: ‖WX − ŴX‖² = ΔE · N / 2
    assert result.total_error * X.shape[1] / 2 == pytest.approx(direct, rel=TOL)
    assert result.weight[:, _cols(result.removed, 3)].abs().max() == 0
    # the compensation is the optimal one for the surviving columns
    best = _least_squares(W, X, _cols(result.kept, 3))
    assert torch.allclose(result.weight, best, atol=1e-9, rtol=0)


def test_first_greedy_choice_matches_exhaustive_search():
    W, X, H = _problem(heads=5, seed=3)
    result = prune_column_groups(W, H, group_size=3, n_remove=1, damping=0.0)
    errors = []
    for h in range(5):
        kept = [k for k in range(5) if k != h]
        errors.append(_direct_error(W, _least_squares(W, X, _cols(kept, 3)), X))
    assert result.removed == [min(range(5), key=errors.__getitem__)]
    assert result.total_error * X.shape[1] / 2 == pytest.approx(min(errors), rel=TOL)


def test_greedy_is_greedy_over_two_steps():
    """Step 2 picks the best second head given the first (checked against every pair containing it)."""
    W, X, H = _problem(heads=5, seed=4)
    result = prune_column_groups(W, H, group_size=3, n_remove=2, damping=0.0)
    first = result.removed[0]
    pair_errors = {h: _direct_error(W, _least_squares(W, X, _cols([k for k in range(5) if k not in (first, h)], 3)), X)
                   for h in range(5) if h != first}
    assert result.removed[1] == min(pair_errors, key=pair_errors.get)
    assert result.total_error * X.shape[1] / 2 == pytest.approx(min(pair_errors.values()), rel=TOL)


def test_partition_removes_evenly_from_every_kv_group():
    W, X, H = _problem(heads=6, seed=5)
    partition = [[0, 1, 2], [3, 4, 5]]
    result = prune_column_groups(W, H, group_size=3, n_remove=2, damping=0.0, partition=partition)
    assert sorted(h // 3 for h in result.removed) == [0, 1]
    # the best balanced pair by exhaustive search of the 9 balanced pairs scores no better than greedy's
    best = min(_direct_error(W, _least_squares(W, X, _cols([k for k in range(6) if k not in (a, b)], 3)), X)
               for a, b in itertools.product(partition[0], partition[1]))
    assert result.total_error * X.shape[1] / 2 >= best * (1 - TOL)


def test_channel_batches_error_and_compensation():
    W, X, H = _problem(out=6, heads=20, head_dim=1, tokens=80, seed=6)
    result = prune_channels(W, H, 7, damping=0.0, batch_sizes=[4, 2, 1])
    assert len(result.removed) == 7 and len(result.kept) == 13
    assert result.total_error * X.shape[1] / 2 == pytest.approx(_direct_error(W, result.weight, X), rel=TOL)
    assert torch.allclose(result.weight, _least_squares(W, X, result.kept), atol=1e-9, rtol=0)


def test_damping_matches_augmented_inputs():
    """Damping λI in H is exact OBS for inputs augmented by √(λN/2)·I (so ‖ΔW‖ is penalised too)."""
    W, X, H = _problem(seed=7)
    damping = 0.01
    lam = damping * torch.diag(H).mean()
    result = prune_column_groups(W, H, group_size=3, n_remove=1, damping=damping)
    N = X.shape[1]
    X_aug = torch.cat([X, torch.sqrt(lam * N / 2) * torch.eye(X.shape[0], dtype=X.dtype)], dim=1)
    assert result.total_error * N / 2 == pytest.approx(_direct_error(W, result.weight, X_aug), rel=1e-8)


def test_dead_inputs_do_not_break_the_inverse():
    W, X, H = _problem(seed=8)
    X[4] = 0.0
    H = 2 * X @ X.T / X.shape[1]
    result = prune_column_groups(W, H, group_size=3, n_remove=1, damping=0.01)
    assert torch.isfinite(result.weight).all()


def test_dynamic_group_sizes_follow_the_public_code():
    assert dynamic_group_sizes(2000) == [744] + [64] * 19 + [40]  # 2000 − 744 = 19·64 + 40
    assert dynamic_group_sizes(4000) == [1024] + [64] * 46 + [32]
    assert dynamic_group_sizes(100) == [64, 36]
    assert sum(dynamic_group_sizes(12345)) == 12345
