"""Gradient projection math as pure functions on one 2-D tensor (GaLore / RGP).

Conventions follow `galore_torch.GaLoreProjector` with ``proj_type="std"`` exactly:

* G is the full gradient, shape (m, n).
* side "right" (chosen by "std" when m >= n): basis Q of shape (n, r) = the top-r right singular vectors
  (galore stores ``Vh[:r]`` of shape (r, n); our Q is its transpose, a view with the same memory layout, so
  the matmuls below are the very ones galore runs).  low = G @ Q, shape (m, r); back = low @ Q^T, (m, n).
* side "left" (chosen by "std" when m < n): basis P of shape (m, r) = the top-r left singular vectors.
  low = P^T @ G, shape (r, n); back = P @ low, (m, n).
* The side is decided from the *full* parameter shape, never from a shard's.  "left"/"right" force a side.

Bases are always float32 (the SVD runs in float32 whatever the gradient dtype, as galore does).

The randomized basis (RGP) is a Halko-Martinsson-Tropp randomized SVD: a Gaussian test matrix with k = r + p
columns (oversampling p), optional power (subspace) iterations with QR re-orthonormalisation after every
product, then an exact SVD of the small (k x .) matrix.  The test matrix is drawn on the CPU from a
`torch.Generator` seeded by (parameter name, refresh step) - so any rank that computes the basis of a given
parameter at a given step gets the identical test matrix, whatever its device or RNG state.
"""
from __future__ import annotations

import hashlib

import torch

SIDES = ("left", "right")
PROJ_TYPES = ("std", "left", "right")


def choose_side(shape: tuple[int, ...] | torch.Size, proj_type: str = "std") -> str:
    """Which side to project on for a full parameter of `shape` (m, n): "right" reduces n, "left" reduces m."""
    if proj_type == "std":
        m, n = shape
        return "right" if m >= n else "left"
    if proj_type in SIDES:
        return proj_type
    raise ValueError(f"unknown proj_type {proj_type!r}; use one of {', '.join(PROJ_TYPES)}")


def check_rank(shape, rank: int, name: str = "") -> None:
    """One-line ValueError when `rank` cannot project a matrix of `shape`."""
    m, n = shape
    where = f" for {name} {tuple(shape)}" if name else f" for shape {tuple(shape)}"
    if rank < 1:
        raise ValueError(f"projection rank must be >= 1, got {rank}{where}; set optim.rank to a positive value")
    if rank > min(m, n):
        raise ValueError(f"projection rank {rank} exceeds min(m, n) = {min(m, n)}{where}; "
                         f"set optim.rank <= {min(m, n)}")


def exact_basis(grad: torch.Tensor, rank: int, side: str) -> torch.Tensor:
    """Top-`rank` singular vectors of grad (m, n) by `torch.linalg.svd` in float32.

    Returns Q (n, r) for side "right" (stored as the transpose of a contiguous (r, n) block, like galore's
    ``Vh[:r]``), P (m, r) contiguous for side "left".
    """
    g = grad.detach()
    g = g if g.dtype == torch.float32 else g.float()
    U, _s, Vh = torch.linalg.svd(g, full_matrices=False)  # U (m, q), Vh (q, n), q = min(m, n)
    if side == "right":
        return Vh[:rank].clone().t()                         # (n, r), strides (1, n)
    if side == "left":
        return U[:, :rank].clone()                           # (m, r)
    raise ValueError(f"side must be left or right, got {side!r}")


def projection_seed(name: str, step: int) -> int:
    """A 63-bit seed from (parameter name, refresh step): identical on every rank and every run."""
    digest = hashlib.sha256(f"{name}\x00{int(step)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def sketch_matrix(rows: int, cols: int, name: str, step: int) -> torch.Tensor:
    """The Gaussian test matrix (rows, cols), float32 on the CPU, seeded from (name, step)."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed(projection_seed(name, step))
    # device="cpu" explicitly: the generator is a CPU one, and a user's torch.set_default_device("cuda") must not
    # move (or break) the draw; the caller copies the result to the gradient's device.
    return torch.randn(rows, cols, generator=gen, dtype=torch.float32, device="cpu")


def _orthonormal(y: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(y, mode="reduced").Q


def randomized_range(a: torch.Tensor, rank: int, oversampling: int, power_iters: int,
                     name: str, step: int) -> torch.Tensor:
    """Top-`rank` left singular vectors of a (M, N), float32, by randomized SVD; returns (M, rank)."""
    M, N = a.shape
    k = min(rank + max(oversampling, 0), min(M, N))
    omega = sketch_matrix(N, k, name, step).to(a.device)       # (N, k)
    q = _orthonormal(a @ omega)                               # (M, k)
    for _ in range(power_iters):
        z = _orthonormal(a.t() @ q)                           # (N, k)
        q = _orthonormal(a @ z)                               # (M, k)
    return basis_from_sketch(q, q.t() @ a, rank)             # b = q^T a, (k, N)


def basis_from_sketch(q: torch.Tensor, b: torch.Tensor, rank: int) -> torch.Tensor:
    """The last stage of the randomized SVD: from an orthonormal range q (M, k) of A and b = q^T A (k, N), the
    top-`rank` left singular vectors of A, (M, rank). Split out because the sharded optimizer's low-rank
    communication builds q and b from per-rank sketches (optim/sharded.py)."""
    # SVD of the tall b^T = V S U^T instead of the wide b: same factors, but LAPACK (MKL) took 11 s for a
    # 514 x 5461 b here against 0.6 s for its transpose.
    _vb, _s, ub_t = torch.linalg.svd(b.t(), full_matrices=False)  # ub_t (k, k) = U^T
    u = q @ ub_t[:rank].t()                                   # (M, r), orthonormal to rounding
    # The QR is not for orthogonality: it fixes each column's sign from u's own entries. An SVD's signs are
    # arbitrary and can flip between two nearly equal gradients (e.g. two summation orders on 1 vs 2 ranks);
    # with moments kept across refreshes a flipped column flips its moments' meaning. (Dropping it broke
    # the 2-rank vs 1-rank agreement of rgp in tests/distributed.)
    return _orthonormal(u)


def randomized_basis(grad: torch.Tensor, rank: int, side: str, oversampling: int = 2, power_iters: int = 0,
                     name: str = "", step: int = 0) -> torch.Tensor:
    """Randomized counterpart of `exact_basis`, same shapes and sides: Q (n, r) for "right", P (m, r) for "left"."""
    g = grad.detach()
    g = g if g.dtype == torch.float32 else g.float()
    if side == "right":
        return randomized_range(g.t(), rank, oversampling, power_iters, name, step)  # right sing. vecs of G
    if side == "left":
        return randomized_range(g, rank, oversampling, power_iters, name, step)
    raise ValueError(f"side must be left or right, got {side!r}")


def project(grad: torch.Tensor, basis: torch.Tensor, side: str) -> torch.Tensor:
    """G (m, n) -> low-rank: (m, r) = G @ Q for "right", (r, n) = P^T @ G for "left"."""
    if side == "right":
        return torch.matmul(grad, basis)
    return torch.matmul(basis.t(), grad)


def project_back(low: torch.Tensor, basis: torch.Tensor, side: str) -> torch.Tensor:
    """low-rank -> (m, n): low @ Q^T for "right", P @ low for "left" (no scale: the caller applies it)."""
    if side == "right":
        return torch.matmul(low, basis.t())
    return torch.matmul(basis, low)


def change_of_basis(old: torch.Tensor, new: torch.Tensor, side: str) -> torch.Tensor:
    """R that re-expresses a low-rank first moment from the old basis in the new one.

    right: M' = M @ R with R = Q_old^T Q_new (r, r); left: M' = R @ M with R = P_new^T P_old (r, r).
    """
    if side == "right":
        return old.t() @ new
    return new.t() @ old


def reproject_moments(exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, rot: torch.Tensor, side: str):
    """Moments in the new basis after a refresh (moments_on_refresh="project").

    First moment: the exact linear map, M' = M R (right) or R M (left).
    Second moment: v holds per-coordinate E[g_j^2].  A coordinate of the new basis is g'_k = sum_j R_jk g_j;
    if the old coordinates are treated as uncorrelated (the same diagonal assumption Adam makes), then
    E[g'_k^2] = sum_j R_jk^2 E[g_j^2], i.e. V' = V (R*R) (right) or (R*R) V (left).  This keeps v >= 0, keeps
    the total second-moment mass captured by the shared subspace, and is exact when the bases agree up to
    sign/permutation (then R*R is a permutation matrix).
    """
    r2 = rot * rot
    if side == "right":
        return exp_avg @ rot, exp_avg_sq @ r2
    return rot @ exp_avg, r2 @ exp_avg_sq
