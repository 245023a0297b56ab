"""Gradient projection math as pure functions on one 2-D tensor (GaLore / RGP).

Conventions follow `galore_torch.GaLoreProjector` with ``proj_type="std"`` exactly:

* G is the full gradient, shape (m, n).
* side "right" (chosen by "std" when m >= n): basis Q of shape (n, r) = the top-r right singular vectors
  (galore stores ``Vh[:r]`` of shape (r, n); our Q is its transpose, a view with the same memory layout, so
  the matmuls below are the very ones galore runs).  low = G @ Q, shape (m, r); back = low @ Q^T, (m, n).
* side "left" (chosen by "std" when m < n): basis P of shape (m, r) = the top-r left singular vectors.
  low = P^T @ G, shape (r, n); back = P @ low, (m, n).
* The side is decided from the *full* parameter shape, never from a shard's.  "left"/"right" force a side.

Bases are computed in float32 (the SVD runs in float32 whatever the gradient dtype, as galore does); the
optimizer may store them in bfloat16 or int8 (`quantize_basis` / `dequantize_basis`, optim.basis_dtype) and
projects with the float32 dequantized copy.

Rank schedules (docs/design.md, "Rank schedules and basis precision"): `scheduled_rank` is the rank-decaying
schedule (the rank is divided by a ratio at every refresh, down to a floor), `energy_rank` the adaptive rule
(the smallest rank keeping a fraction of the gradient's energy), applied inside `exact_basis` and
`basis_from_sketch` to the singular values their SVDs already compute.

The randomized basis (RGP) is a Halko-Martinsson-Tropp randomized SVD: a Gaussian test matrix with k = r + p
columns (oversampling p), optional power (subspace) iterations with QR re-orthonormalisation after every
product, then an exact SVD of the small (k x .) matrix.  The test matrix is drawn on the CPU from a
`torch.Generator` seeded by (parameter name, refresh step) - so any rank that computes the basis of a given
parameter at a given step gets the identical test matrix, whatever its device or RNG state.
"""
from __future__ import annotations

import hashlib
import math

import torch

SIDES = ("left", "right")
PROJ_TYPES = ("std", "left", "right")
BASIS_DTYPES = ("float32", "bfloat16", "int8")


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


def scheduled_rank(rank: int, decay: float, min_rank: int, refresh: int) -> int:
    """The rank of the `refresh`-th basis (0: the first) of rank-decaying GaLore/RGP: the first basis uses
    `rank`, every later refresh divides the previous rank by `decay` (floor) down to `min_rank` (never above
    `rank`). decay 1: `rank` always. Depends only on the refresh index, so every rank and a resumed run agree."""
    r, floor = rank, min(min_rank, rank)
    for _ in range(refresh):
        nxt = max(floor, math.floor(r / decay))
        if nxt == r:
            break
        r = nxt
    return r


def energy_rank(svals: torch.Tensor, energy: float, cap: int, min_rank: int = 1) -> int:
    """Adaptive rank (AdaRankGrad): the smallest r whose top-r singular values keep the fraction `energy` of
    sum(svals^2), clamped to [min(min_rank, cap), cap]. `svals` in descending order (as SVDs return them).
    The sums run in float64 so that the choice does not hinge on float32 rounding of a long cumulative sum."""
    cum = torch.cumsum(svals.detach().double().square(), 0)
    below = int((cum < energy * cum[-1]).sum().item())   # prefixes still short of the target
    return max(min(min_rank, cap), min(cap, below + 1))


def exact_basis(grad: torch.Tensor, rank: int, side: str, energy: float = 0.0, min_rank: int = 1) -> torch.Tensor:
    """Top-`rank` singular vectors of grad (m, n) by `torch.linalg.svd` in float32.

    Returns Q (n, r) for side "right" (stored as the transpose of a contiguous (r, n) block, like galore's
    ``Vh[:r]``), P (m, r) contiguous for side "left". energy > 0: r = `energy_rank` of the singular values
    (at most `rank`); the caller reads the chosen rank off the basis' second dimension.
    """
    g = grad.detach()
    g = g if g.dtype == torch.float32 else g.float()
    U, s, Vh = torch.linalg.svd(g, full_matrices=False)  # U (m, q), Vh (q, n), q = min(m, n)
    if energy > 0:
        rank = energy_rank(s, energy, rank, min_rank)
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
                     name: str, step: int, energy: float = 0.0, min_rank: int = 1) -> torch.Tensor:
    """Top-`rank` left singular vectors of a (M, N), float32, by randomized SVD; returns (M, rank) (energy > 0:
    (M, r) with r chosen by `basis_from_sketch`)."""
    M, N = a.shape
    k = min(rank + max(oversampling, 0), min(M, N))
    omega = sketch_matrix(N, k, name, step).to(a.device)       # (N, k)
    q = _orthonormal(a @ omega)                               # (M, k)
    for _ in range(power_iters):
        z = _orthonormal(a.t() @ q)                           # (N, k)
        q = _orthonormal(a @ z)                               # (M, k)
    return basis_from_sketch(q, q.t() @ a, rank, energy, min_rank)   # b = q^T a, (k, N)


def basis_from_sketch(q: torch.Tensor, b: torch.Tensor, rank: int, energy: float = 0.0,
                      min_rank: int = 1) -> torch.Tensor:
    """The last stage of the randomized SVD: from an orthonormal range q (M, k) of A and b = q^T A (k, N), the
    top-`rank` left singular vectors of A, (M, rank). Split out because the sharded optimizer's low-rank
    communication builds q and b from per-rank sketches (optim/sharded.py).

    energy > 0 (adaptive rank): r = `energy_rank` of b's k singular values, at most `rank`. The fraction is of
    the energy the sketch captured, sum(s_b^2) = ||q^T A||^2 <= ||A||^2, not of the whole gradient's: measured
    against ||A||^2 a k = r + p sketch of a gradient with a flat spectrum never reaches the target and the
    rank would stay at the cap. (The basis keeps exactly sum_{i<=r} s_b,i^2 of A's energy: P^T A = U_b,r^T b.)"""
    # SVD of the tall b^T = V S U^T instead of the wide b: same factors, but LAPACK (MKL) took 11 s for a
    # 514 x 5461 b here against 0.6 s for its transpose.
    _vb, s, ub_t = torch.linalg.svd(b.t(), full_matrices=False)  # ub_t (k, k) = U^T
    if energy > 0:
        rank = energy_rank(s, energy, rank, min_rank)
    u = q @ ub_t[:rank].t()                                   # (M, r), orthonormal to rounding
    # The QR is not for orthogonality: it fixes each column's sign from u's own entries. An SVD's signs are
    # arbitrary and can flip between two nearly equal gradients (e.g. two summation orders on 1 vs 2 ranks);
    # with moments kept across refreshes a flipped column flips its moments' meaning. (Dropping it broke
    # the 2-rank vs 1-rank agreement of rgp in tests/distributed.)
    return _orthonormal(u)


def randomized_basis(grad: torch.Tensor, rank: int, side: str, oversampling: int = 2, power_iters: int = 0,
                     name: str = "", step: int = 0, energy: float = 0.0, min_rank: int = 1) -> torch.Tensor:
    """Randomized counterpart of `exact_basis`, same shapes and sides: Q (n, r) for "right", P (m, r) for "left".
    The sketch has k = rank + oversampling columns; energy > 0 picks r <= rank from its singular values."""
    g = grad.detach()
    g = g if g.dtype == torch.float32 else g.float()
    if side == "right":   # right singular vectors of G
        return randomized_range(g.t(), rank, oversampling, power_iters, name, step, energy, min_rank)
    if side == "left":
        return randomized_range(g, rank, oversampling, power_iters, name, step, energy, min_rank)
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


def resize_moment(x: torch.Tensor, rank: int, side: str) -> torch.Tensor:
    """A low-rank moment (m, r1) for "right" / (r1, n) for "left" kept across a rank change without re-expressing
    it (moments_on_refresh="keep"): the first `rank` coordinates (singular values come in descending order, so
    the leading directions are the ones kept), or zeros appended for new directions (no history yet; only the
    adaptive rank grows). A fresh contiguous tensor: a view would keep the old storage alive."""
    r1 = x.shape[1] if side == "right" else x.shape[0]
    if rank <= r1:
        return (x[:, :rank] if side == "right" else x[:rank]).contiguous().clone()
    pad = (0, rank - r1) if side == "right" else (0, 0, 0, rank - r1)
    return torch.nn.functional.pad(x, pad)


def quantize_basis(basis: torch.Tensor, dtype: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A float32 basis (rows, r) -> (stored tensor, per-column fp32 scale or None) in optim.basis_dtype.

    int8 is symmetric absmax quantization per column, code = round(x / s), s = max|column| / 127. Why not
    bitsandbytes' blockwise dynamic map (the 8-bit moments' format): that map spends its codes on the heavy-tailed,
    wide-ranged values of Adam moments, whereas a basis column is a unit vector whose entries are all of the order
    1/sqrt(rows); uniform codes bound every entry's error by s / 2 = max|column| / 254, each column (one direction)
    is scaled on its own, the right-side basis' transposed layout needs no flattening into blocks, and the cost is
    4 bytes per column (r values) instead of 4 per 256 values."""
    if dtype == "float32":
        return basis, None
    if dtype == "bfloat16":
        return basis.to(torch.bfloat16), None
    if dtype == "int8":
        absmax = basis.abs().amax(dim=0)
        scale = torch.where(absmax > 0, absmax / 127, torch.ones_like(absmax))   # an all-zero column: any scale
        return torch.round(basis / scale).clamp_(-127, 127).to(torch.int8), scale
    raise ValueError(f"unknown basis dtype {dtype!r}; use one of {', '.join(BASIS_DTYPES)}")


def dequantize_basis(stored: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """The float32 basis the projection uses; the stored tensor itself when it is float32. Decided by the stored
    dtype, so a state saved with another optim.basis_dtype still reads right."""
    if stored.dtype == torch.int8:
        return stored.float() * scale
    return stored if stored.dtype == torch.float32 else stored.float()
