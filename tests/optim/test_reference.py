"""Differential tests: our update rules against torch.optim.AdamW, bitsandbytes AdamW8bit, galore-torch."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

from config import OptimConfig
from optim import build_optimizer


def _grads(shape, steps, seed):
    g = torch.Generator().manual_seed(seed)
    # a decaying spectrum so the SVD basis is well defined (no near-ties among the top-r singular values)
    m, n = shape
    q = min(m, n)
    out = []
    for _ in range(steps):
        u, _ = torch.linalg.qr(torch.randn(m, q, generator=g))
        v, _ = torch.linalg.qr(torch.randn(n, q, generator=g))
        s = torch.logspace(0, -3, q)
        out.append((u * s) @ v.t() + 1e-4 * torch.randn(m, n, generator=g))
    return out


def _run(opt, params, grads_per_param):
    steps = len(grads_per_param[0])
    for t in range(steps):
        for p, gs in zip(params, grads_per_param):
            p.grad = gs[t].clone()
        opt.step()
        opt.zero_grad()


def _params(shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g) * 0.1 for s in shapes]


@pytest.mark.parametrize("foreach", [False, True], ids=["single_tensor", "multi_tensor"])
def test_adamw_equals_torch_adamw_exactly(foreach):
    """step() (multi-tensor for the fp32 group) and step_param() (one tensor, the layer-wise path) both equal
    torch.optim.AdamW in either implementation, bit for bit, including a parameter whose gradient is missing
    at one step (its own step count lags behind the others')."""
    shapes = [(40, 24), (24,), (8, 8, 3)]
    init = _params(shapes)
    grads = [[torch.randn(*s) for _ in range(5)] for s in shapes]
    cfg = OptimConfig(name="adamw", lr=3e-3, weight_decay=0.1, beta1=0.8, beta2=0.95, eps=1e-7)
    ours = [nn.Parameter(x.clone()) for x in init]
    per_param = [nn.Parameter(x.clone()) for x in init]
    ref = [nn.Parameter(x.clone()) for x in init]
    opt = build_optimizer([(f"w{i}", p) for i, p in enumerate(ours)], cfg)
    popt = build_optimizer([(f"w{i}", p) for i, p in enumerate(per_param)], cfg)
    ropt = torch.optim.AdamW(ref, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                             weight_decay=cfg.weight_decay, foreach=foreach)
    for t in range(5):
        lr = cfg.lr * (t + 1) / 5           # the train loop changes group["lr"] every step
        for o in (opt, popt, ropt):
            for group in o.param_groups:
                group["lr"] = lr
        for i, (p, pp, q, gs) in enumerate(zip(ours, per_param, ref, grads)):
            g = None if (i, t) == (1, 2) else gs[t]
            p.grad, pp.grad, q.grad = [None if g is None else g.clone() for _ in range(3)]
        opt.step()
        for p in per_param:
            popt.step_param(p)
        ropt.step()
    for p, pp, q in zip(ours, per_param, ref):
        assert torch.equal(p, q) and torch.equal(pp, q)


def test_adamw8bit_equals_bitsandbytes():
    import bitsandbytes as bnb
    shapes = [(96, 64), (128, 100), (30, 20), (64,)]   # 6144 and 12800 elements (8-bit), 600 and 64 (fp32)
    init = _params(shapes, seed=1)
    gen = torch.Generator().manual_seed(2)
    grads = [[torch.randn(*s, generator=gen) for _ in range(6)] for s in shapes]
    cfg = OptimConfig(name="adamw8bit", lr=1e-2, weight_decay=0.05, eps=1e-8)
    ours = [nn.Parameter(x.clone()) for x in init]
    ref = [nn.Parameter(x.clone()) for x in init]
    opt = build_optimizer([(f"w{i}", p) for i, p in enumerate(ours)], cfg)
    ropt = bnb.optim.AdamW8bit(ref, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                               weight_decay=cfg.weight_decay)
    for t in range(6):
        for p, q, gs in zip(ours, ref, grads):
            p.grad, q.grad = gs[t].clone(), gs[t].clone()
        opt.step()
        ropt.step()
    for p, q in zip(ours, ref):
        assert torch.equal(p, q), (p - q).abs().max()
    for p, q in zip(ours, ref):
        st, rst = opt.state[p], ropt.state[q]
        if p.numel() >= 4096:
            assert st["state1"].dtype == torch.uint8
            assert torch.equal(st["state1"], rst["state1"]) and torch.equal(st["absmax2"], rst["absmax2"])
        else:
            assert st["exp_avg"].dtype == torch.float32 and rst["state1"].dtype == torch.float32


@pytest.mark.parametrize("shape", [(48, 20), (20, 48)])     # right (m >= n) and left (m < n) projection
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_galore_matches_galore_torch(shape, weight_decay):
    """Tolerance: atol 1e-6 on weights of magnitude ~0.1.  Observed on this machine: bit-identical (torch.equal)
    for both orientations with and without weight decay; the tolerance only allows for BLAS builds where the
    left basis' different memory layout (a contiguous copy vs galore's view of U) changes summation order."""
    from galore_torch import GaLoreAdamW
    rank, gap, steps = 6, 2, 6                     # refreshes at steps 0, 2, 4
    init = _params([shape], seed=3)[0]
    grads = _grads(shape, steps, seed=4)
    cfg = OptimConfig(name="galore", lr=1e-2, rank=rank, update_proj_gap=gap, scale=0.25, eps=1e-8,
                      weight_decay=weight_decay)
    ours = nn.Parameter(init.clone())
    ref = nn.Parameter(init.clone())
    opt = build_optimizer([("layers.0.mlp.up_proj.weight", ours)], cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ropt = GaLoreAdamW([{"params": [ref], "rank": rank, "update_proj_gap": gap, "scale": 0.25,
                             "proj_type": "std"}], lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                           weight_decay=weight_decay, no_deprecation_warning=True)
    for t in range(steps):
        ours.grad, ref.grad = grads[t].clone(), grads[t].clone()
        opt.step()
        ropt.step()
        torch.testing.assert_close(ours.data, ref.data, rtol=0, atol=1e-6)
    low_shape = (shape[0], rank) if shape[0] >= shape[1] else (rank, shape[1])
    assert opt.state[ours]["exp_avg"].shape == low_shape


def test_full_rank_projection_equals_plain_adam():
    """rank = min(m, n), scale = 1.  Adam is not rotation invariant (sqrt(v) is elementwise), so the projected
    update equals plain Adam's only when the basis is a signed permutation; gradients G_t = D_t (a
    rectangular diagonal with distinct decaying entries) give exactly that basis.  Same eps convention
    (galore's: sqrt(v) + eps) on both sides: plain Adam here is galore_torch.AdamW without projection."""
    from galore_torch import GaLoreAdamW as GaloreTorchAdamW  # no "rank" in the group: plain Adam
    m, n = 12, 7
    gen = torch.Generator().manual_seed(5)
    grads = []
    for _ in range(4):
        g = torch.zeros(m, n)
        g[range(n), range(n)] = torch.logspace(0, -2, n) * (1 + 0.1 * torch.rand(n, generator=gen))
        grads.append(g)
    init = _params([(m, n)], seed=6)[0]
    ours, ref = nn.Parameter(init.clone()), nn.Parameter(init.clone())
    cfg = OptimConfig(name="galore", lr=1e-2, rank=n, scale=1.0, update_proj_gap=1000)
    opt = build_optimizer([("layers.0.self_attn.q_proj.weight", ours)], cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ropt = GaloreTorchAdamW([ref], lr=cfg.lr, eps=cfg.eps, no_deprecation_warning=True)
    for g in grads:
        ours.grad, ref.grad = g.clone(), g.clone()
        opt.step()
        ropt.step()
    torch.testing.assert_close(ours.data, ref.data, rtol=0, atol=1e-7)
    # and close to torch's AdamW (which scales eps by 1/sqrt(bc2)): same trajectory up to the eps convention
    tor = nn.Parameter(init.clone())
    topt = torch.optim.AdamW([tor], lr=cfg.lr, eps=cfg.eps, weight_decay=0.0)
    for g in grads:
        tor.grad = g.clone()
        topt.step()
    torch.testing.assert_close(ours.data, tor.data, rtol=0, atol=1e-5)


def test_rgp_close_to_galore_on_low_rank_gradients():
    """With gradients of exact rank r the randomized basis spans the same subspace as the SVD basis, so RGP's
    weights track GaLore's closely (not exactly: the bases differ by a rotation within the subspace)."""
    shape, r = (40, 30), 4
    gen = torch.Generator().manual_seed(7)
    grads = [torch.randn(40, r, generator=gen) @ torch.randn(r, 30, generator=gen) for _ in range(3)]
    out = {}
    for name in ("galore", "rgp"):
        p = nn.Parameter(torch.zeros(shape))
        opt = build_optimizer([("layers.0.mlp.down_proj.weight", p)],
                              OptimConfig(name=name, rank=r, update_proj_gap=1, lr=1e-2))
        for g in grads:
            p.grad = g.clone()
            opt.step()
        out[name] = p.data
    # the first step's update is sign-like per coordinate, hence rotation dependent; compare loosely
    assert torch.nn.functional.cosine_similarity(out["galore"].flatten(), out["rgp"].flatten(), dim=0) > 0.5
