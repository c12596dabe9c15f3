"""The chunked SSD scan and the one-token step against a naive float64 recurrence (tests/helpers/hybrid.py)."""

from __future__ import annotations

import pytest
import torch

from compress.hybrid.zebra_ssd import ssd_chunked, ssd_step
from tests.helpers.hybrid import naive_scan


def _inputs(length, heads, groups, seed=0, b=2, p=5, n=6):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, length, heads, p, generator=g)
    dt = torch.rand(b, length, heads, generator=g) * 0.5 + 0.01
    A = -(torch.rand(heads, generator=g) * 3 + 0.1)
    B = torch.randn(b, length, groups, n, generator=g)
    C = torch.randn(b, length, groups, n, generator=g)
    state = torch.randn(b, heads, p, n, generator=g)
    return x, dt, A, B, C, state


@pytest.mark.parametrize("length", [1, 7, 8, 16, 37])  # below, at and across chunk boundaries, not multiples
@pytest.mark.parametrize("groups", [1, 4])  # one group shared by all heads, or groups = heads
@pytest.mark.parametrize("with_state", [False, True])
def test_chunked_scan_equals_the_naive_recurrence(length, groups, with_state):
    x, dt, A, B, C, state = _inputs(length, 4, groups)
    state = state if with_state else None
    want_y, want_s = naive_scan(x, dt, A, B, C, state)
    y, final = ssd_chunked(x, dt, A, B, C, chunk_size=8, initial_state=state)
    assert y.dtype == torch.float32
    # float32 against the float64 reference, relative to the outputs' scale
    assert (y.double() - want_y).abs().max() <= 1e-5 * max(1.0, want_y.abs().max())
    assert (final.double() - want_s).abs().max() <= 1e-5 * max(1.0, want_s.abs().max())


def test_chunked_scan_in_float64_is_exact_and_chunk_size_does_not_matter():
    x, dt, A, B, C, state = (t.double() for t in _inputs(29, 4, 2, seed=1))
    want_y, want_s = naive_scan(x, dt, A, B, C, state)
    for chunk in (1, 4, 8, 64):
        y, final = ssd_chunked(x, dt, A, B, C, chunk_size=chunk, initial_state=state)
        assert torch.allclose(y, want_y, atol=1e-10) and torch.allclose(final, want_s, atol=1e-10)


def test_step_by_step_equals_the_naive_recurrence():
    x, dt, A, B, C, state = _inputs(11, 4, 2, seed=2)
    want_y, want_s = naive_scan(x, dt, A, B, C, state)
    s = state.clone()
    for t in range(11):
        y, s = ssd_step(s, x[:, t], dt[:, t], A, B[:, t], C[:, t])
        assert (y.double() - want_y[:, t]).abs().max() <= 1e-5 * max(1.0, want_y.abs().max())
    assert (s.double() - want_s).abs().max() <= 1e-5 * max(1.0, want_s.abs().max())


def test_prefill_state_then_chunked_continuation_equals_one_scan():
    """State passing between calls (chunked prefill): scan(a ++ b) = scan(b, from scan(a)'s state)."""
    x, dt, A, B, C, _ = _inputs(30, 4, 4, seed=3)
    y_all, s_all = ssd_chunked(x, dt, A, B, C, chunk_size=8)
    y1, s1 = ssd_chunked(x[:, :13], dt[:, :13], A, B[:, :13], C[:, :13], chunk_size=8)
    y2, s2 = ssd_chunked(x[:, 13:], dt[:, 13:], A, B[:, 13:], C[:, 13:], chunk_size=8, initial_state=s1)
    assert torch.allclose(torch.cat([y1, y2], 1), y_all, atol=1e-5) and torch.allclose(s2, s_all, atol=1e-5)
