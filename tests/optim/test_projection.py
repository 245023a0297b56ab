"""Projection math: orientation, exact and randomized bases, seeding, moment re-projection."""
from __future__ import annotations

import pytest
import torch

from optim import projection as P


def _decaying(m, n, seed=0, decay=0.7, gap_after=None):
    """A matrix with singular values decay**i (times 1e-2 after index `gap_after`, like a gradient whose
    energy sits in a few directions) and its singular vectors."""
    g = torch.Generator().manual_seed(seed)
    q = min(m, n)
    u, _ = torch.linalg.qr(torch.randn(m, q, generator=g))
    v, _ = torch.linalg.qr(torch.randn(n, q, generator=g))
    s = decay ** torch.arange(q, dtype=torch.float32)
    if gap_after is not None:
        s[gap_after:] *= 1e-2
    return (u * s) @ v.t(), u, v


def test_side_follows_full_shape_and_galore_std():
    assert P.choose_side((100, 40)) == "right"
    assert P.choose_side((40, 40)) == "right"      # galore: m >= n -> right
    assert P.choose_side((40, 100)) == "left"
    assert P.choose_side((100, 40), "left") == "left"
    assert P.choose_side((40, 100), "right") == "right"
    with pytest.raises(ValueError, match="proj_type"):
        P.choose_side((4, 4), "diag")


@pytest.mark.parametrize("shape", [(60, 30), (30, 60)])
@pytest.mark.parametrize("side", ["std", "left", "right"])
def test_exact_basis_shapes_and_projection(shape, side):
    g, _, _ = _decaying(*shape)
    s = P.choose_side(shape, side)
    r = 5
    q = P.exact_basis(g, r, s)
    m, n = shape
    assert q.shape == ((n, r) if s == "right" else (m, r))
    torch.testing.assert_close(q.t() @ q, torch.eye(r), atol=1e-5, rtol=0)
    low = P.project(g, q, s)
    assert low.shape == ((m, r) if s == "right" else (r, n))
    back = P.project_back(low, q, s)
    assert back.shape == shape
    # rank-r truncation error equals the tail of the spectrum
    tail = torch.linalg.svdvals(g)[r:].square().sum().sqrt()
    torch.testing.assert_close((g - back).norm(), tail, rtol=1e-3, atol=1e-5)


def test_full_rank_projection_round_trips():
    g = torch.randn(20, 12)
    for s in ("left", "right"):
        q = P.exact_basis(g, 12, s)
        torch.testing.assert_close(P.project_back(P.project(g, q, s), q, s), g, atol=1e-5, rtol=0)


@pytest.mark.parametrize("shape", [(200, 120), (120, 200)])
@pytest.mark.parametrize("power_iters", [0, 2])
def test_randomized_basis_spans_top_subspace(shape, power_iters):
    m, n = shape
    r = 8
    g, u, v = _decaying(m, n, seed=1, decay=0.9, gap_after=r)
    for side, ref in (("left", u[:, :r]), ("right", v[:, :r])):
        q = P.randomized_basis(g, r, side, oversampling=2, power_iters=power_iters, name="w", step=0)
        assert q.shape == ref.shape
        torch.testing.assert_close(q.t() @ q, torch.eye(r), atol=1e-5, rtol=0)
        # sin of the largest principal angle between span(q) and the true top-r singular subspace
        resid = torch.linalg.matrix_norm(ref - q @ (q.t() @ ref), ord=2).item()
        assert resid < (1e-1 if power_iters == 0 else 1e-4), resid


def test_randomized_basis_is_seeded_by_name_and_step():
    g, _, _ = _decaying(80, 50, seed=2, decay=0.95)    # slow decay: the sketch matters
    a = P.randomized_basis(g, 6, "right", 2, 0, name="layers.0.q", step=200)
    b = P.randomized_basis(g.clone(), 6, "right", 2, 0, name="layers.0.q", step=200)
    assert torch.equal(a, b)
    torch.manual_seed(123)                              # global RNG state is irrelevant
    c = P.randomized_basis(g, 6, "right", 2, 0, name="layers.0.q", step=200)
    assert torch.equal(a, c)
    assert torch.equal(P.sketch_matrix(50, 8, "layers.0.q", 200), P.sketch_matrix(50, 8, "layers.0.q", 200))
    assert not torch.equal(P.sketch_matrix(50, 8, "layers.0.q", 200), P.sketch_matrix(50, 8, "layers.0.q", 400))
    assert not torch.equal(P.sketch_matrix(50, 8, "layers.0.q", 200), P.sketch_matrix(50, 8, "layers.0.k", 200))
    d = P.randomized_basis(g, 6, "right", 2, 0, name="layers.0.q", step=400)
    assert not torch.equal(a, d)


def test_oversampling_is_clamped_to_matrix_size():
    g = torch.randn(10, 6)
    q = P.randomized_basis(g, 6, "right", oversampling=4, power_iters=1, name="x", step=0)
    assert q.shape == (6, 6)


def test_reproject_moments_is_exact_for_first_moment():
    # full-rank bases (r = the reduced dimension), so the old basis spans everything and M' must be exact
    for side, shape in (("left", (20, 30)), ("right", (30, 20))):
        g, _, _ = _decaying(*shape, seed=3)
        old = P.exact_basis(torch.randn(*shape), 20, side)
        new = P.exact_basis(g, 20, side)
        low_old = P.project(g, old, side)
        rot = P.change_of_basis(old, new, side)
        m2, v2 = P.reproject_moments(low_old, low_old.square(), rot, side)
        torch.testing.assert_close(m2, P.project(g, new, side), atol=1e-5, rtol=0)
        assert (v2 >= 0).all()
        # same basis: second moment unchanged
        same = P.change_of_basis(new, new, side)
        _, v3 = P.reproject_moments(low_old, low_old.square(), same, side)
        torch.testing.assert_close(v3, low_old.square(), atol=1e-5, rtol=1e-4)


def test_check_rank_errors():
    with pytest.raises(ValueError, match="exceeds min"):
        P.check_rank((10, 20), 11, "w")
    with pytest.raises(ValueError, match=">= 1"):
        P.check_rank((10, 20), 0)
    P.check_rank((10, 20), 10)
