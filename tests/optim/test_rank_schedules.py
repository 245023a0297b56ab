"""Rank-decaying and adaptive-rank GaLore/RGP, low-precision bases (docs/design.md, "Rank schedules and basis
precision"): each checked against plain-torch reference math, real state bytes, and bit-identical resume."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from config import OptimConfig
from model import build_model
from optim import build_optimizer, validate_optim_config
from optim import projection as P
from optim.adam import BLOCKSIZE, dequantize, load_moments, qmaps, quantize, set_basis, state_bytes
from optim.sharded import tensor_bytes

NAME = "layers.0.mlp.up_proj.weight"


def _cfg(name, **kw):
    kw.setdefault("rank", 8)
    kw.setdefault("update_proj_gap", 2)
    kw.setdefault("lr", 1e-2)
    return OptimConfig(name=name, **kw)


def _grad(m, n, seed, decay=0.8):
    """A gradient with singular values decay**i: a clear energy profile for the adaptive rule."""
    g = torch.Generator().manual_seed(seed)
    q = min(m, n)
    u, _ = torch.linalg.qr(torch.randn(m, q, generator=g))
    v, _ = torch.linalg.qr(torch.randn(n, q, generator=g))
    return (u * decay ** torch.arange(q, dtype=torch.float32)) @ v.t()


def _ref_energy_rank(svals, energy, cap, floor):
    """The adaptive rule in plain Python: smallest r with sum(s[:r]^2) >= energy * sum(s^2), clamped."""
    e = [float(x) ** 2 for x in svals]
    total, acc = sum(e), 0.0
    for r, x in enumerate(e, start=1):
        acc += x
        if acc >= energy * total:
            return max(min(floor, cap), min(cap, r))
    return cap


def _model(seed=0):
    torch.manual_seed(seed)
    return build_model("tiny", 256, 16, dim=64, n_layers=2, n_heads=2, intermediate_size=96)


def _train(model, opt, start, stop):
    for t in range(start, stop):
        x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1000 + t))
        model(x, x)[1].backward()
        for group in opt.param_groups:
            group["lr"] = 1e-2 * (0.5 + 0.5 * (t % 3))
        opt.step()
        opt.zero_grad(set_to_none=True)


# ------------------------------------------------------------------------------------------- rank decay

def test_scheduled_rank_sequence():
    assert [P.scheduled_rank(256, 2, 4, k) for k in range(9)] == [256, 128, 64, 32, 16, 8, 4, 4, 4]
    assert [P.scheduled_rank(256, 4, 4, k) for k in range(5)] == [256, 64, 16, 4, 4]     # the paper's ratio 4
    assert [P.scheduled_rank(256, 1.5, 4, k) for k in range(4)] == [256, 170, 113, 75]   # floor at each refresh
    assert [P.scheduled_rank(100, 3, 5, k) for k in range(4)] == [100, 33, 11, 5]        # min_rank is the floor
    assert all(P.scheduled_rank(64, 1.0, 4, k) == 64 for k in range(50))                 # 1: off


@pytest.mark.parametrize("name", ["galore", "rgp8bit"])
def test_optimizer_rank_decays_at_each_refresh(name):
    """rank 16, ratio 2, min 4, refresh every 2 steps: basis and moments 16 -> 8 -> 4 -> 4 columns."""
    p = nn.Parameter(torch.zeros(96, 64))
    opt = build_optimizer([(NAME, p)], _cfg(name, rank=16, rank_decay=2.0, min_rank=4))
    seen = []
    for t in range(8):
        p.grad = _grad(96, 64, seed=t)
        opt.step()
        st = opt.state[p]
        r = opt.current_ranks()[NAME]
        seen.append(r)
        assert st["basis"].shape == (64, r)                      # side "right": (n, r)
        assert load_moments(st)[0].shape == (96, r)
    assert seen == [16, 16, 8, 8, 4, 4, 4, 4]


@pytest.mark.parametrize("side,shape", [("right", (40, 24)), ("left", (24, 40))])
@pytest.mark.parametrize("mode", ["keep", "project"])
def test_shrinking_moments_equal_reference(side, shape, mode):
    """set_basis from rank 8 to rank 3: "keep" keeps the first 3 coordinates, "project" applies the rectangular
    change of basis (M R, V (R*R) on the right; R M, (R*R) V on the left), both as fresh, smaller tensors."""
    g = torch.Generator().manual_seed(0)
    old = P.exact_basis(torch.randn(*shape, generator=g), 8, side)
    new = P.exact_basis(torch.randn(*shape, generator=g), 3, side)
    low_shape = (shape[0], 8) if side == "right" else (8, shape[1])
    m, v = torch.randn(*low_shape, generator=g), torch.rand(*low_shape, generator=g)
    st = {"step": 5, "basis": old.clone(), "exp_avg": m.clone(), "exp_avg_sq": v.clone()}
    set_basis(st, new, side, mode)
    if mode == "keep":
        want_m, want_v = (m[:, :3], v[:, :3]) if side == "right" else (m[:3], v[:3])
    else:
        if side == "right":
            rot = old.t() @ new                  # (8, 3): old coordinates -> new ones
            want_m, want_v = m @ rot, v @ (rot * rot)
        else:
            rot = new.t() @ old                  # (3, 8)
            want_m, want_v = rot @ m, (rot * rot) @ v
    assert torch.equal(st["basis"], new)
    torch.testing.assert_close(st["exp_avg"], want_m, rtol=0, atol=0)
    torch.testing.assert_close(st["exp_avg_sq"], want_v, rtol=0, atol=0)
    assert st["exp_avg"].is_contiguous() and st["exp_avg"].untyped_storage().nbytes() == 4 * want_m.numel()


def test_shrinking_8bit_moments_dequantize_shrink_requantize():
    """8-bit moments: the new codes are bnb's quantization of the dequantized, truncated moments; the format stays
    8-bit even below bnb's 4096-value threshold (decided at the start rank)."""
    g = torch.Generator().manual_seed(1)
    old = P.exact_basis(torch.randn(512, 64, generator=g), 16, "right")
    new = P.exact_basis(torch.randn(512, 64, generator=g), 4, "right")
    m_map, v_map = qmaps("cpu")
    c1, a1 = quantize(torch.randn(512, 16, generator=g) * 1e-2, m_map)
    c2, a2 = quantize(torch.rand(512, 16, generator=g) * 1e-4, v_map)
    st = {"step": 3, "basis": old, "state1": c1, "absmax1": a1, "state2": c2, "absmax2": a2}
    set_basis(st, new, "right", "keep")
    want_m = dequantize(c1, a1, m_map)[:, :4].contiguous()
    want_v = dequantize(c2, a2, v_map)[:, :4].contiguous()
    ref_c1, ref_a1 = quantize(want_m, m_map)
    ref_c2, ref_a2 = quantize(want_v, v_map)
    assert st["state1"].shape == (512, 4) and st["state1"].dtype == torch.uint8     # 2048 values, still 8-bit
    assert torch.equal(st["state1"], ref_c1) and torch.equal(st["absmax1"], ref_a1)
    assert torch.equal(st["state2"], ref_c2) and torch.equal(st["absmax2"], ref_a2)
    assert st["absmax1"].numel() == math.ceil(512 * 4 / BLOCKSIZE)


def test_keep_mode_step_after_decay_matches_reference_math():
    """One full GaLore step right after a decaying refresh, against plain torch: m = b1 m_old[:, :r2] + (1-b1) G Q,
    v likewise, p -= lr sqrt(bc2)/bc1 * scale * (m / (sqrt(v) + eps)) Q^T."""
    p = nn.Parameter(torch.randn(48, 32) * 0.1)
    cfg = _cfg("galore", rank=8, rank_decay=2.0, min_rank=2, weight_decay=0.0)
    opt = build_optimizer([(NAME, p)], cfg)
    for t in range(2):
        p.grad = _grad(48, 32, seed=t)
        opt.step()
    st = opt.state[p]
    m_old, v_old, p_old = st["exp_avg"].clone(), st["exp_avg_sq"].clone(), p.detach().clone()
    g2 = _grad(48, 32, seed=2)
    p.grad = g2
    opt.step()                                   # step 2: refresh at rank 4
    q = torch.linalg.svd(g2, full_matrices=False).Vh[:4].t()
    low = g2 @ q
    b1, b2 = cfg.beta1, cfg.beta2
    m = b1 * m_old[:, :4] + (1 - b1) * low
    v = b2 * v_old[:, :4] + (1 - b2) * low * low
    step_size = cfg.lr * math.sqrt(1 - b2 ** 3) / (1 - b1 ** 3)
    want = p_old - step_size * cfg.scale * ((m / (v.sqrt() + cfg.eps)) @ q.t())
    torch.testing.assert_close(st["exp_avg"], m, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(st["exp_avg_sq"], v, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(p.detach(), want, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------- adaptive rank

@pytest.mark.parametrize("energy", [0.5, 0.9, 0.99])
@pytest.mark.parametrize("shape", [(80, 48), (48, 80)])
def test_adaptive_rank_galore_equals_svdvals_reference(energy, shape):
    g = _grad(*shape, seed=3, decay=0.85)
    p = nn.Parameter(torch.zeros(*shape))
    opt = build_optimizer([(NAME, p)], _cfg("galore", rank=24, rank_energy=energy, min_rank=2))
    p.grad = g
    opt.step()
    want = _ref_energy_rank(torch.linalg.svdvals(g), energy, 24, 2)
    assert opt.current_ranks() == {NAME: want}
    side = P.choose_side(shape)
    torch.testing.assert_close(opt.state[p]["basis"], P.exact_basis(g, want, side), rtol=0, atol=0)
    # a target the cap cannot meet gives the cap; a flat-at-the-top one the floor
    assert P.energy_rank(torch.ones(40), 0.9, 24, 2) == 24
    assert P.energy_rank(torch.tensor([10.0, 1e-3, 1e-3]), 0.9, 3, 2) == 2


@pytest.mark.parametrize("shape", [(80, 48), (48, 80)])
def test_adaptive_rank_rgp_equals_rule_on_sketch_singular_values(shape):
    """RGP: the rule on the k = cap + p singular values of the sketch b = Q^T A (built here by hand from the same
    seeded test matrix), not on the full spectrum."""
    g = _grad(*shape, seed=4, decay=0.9)
    cap, over, energy = 12, 3, 0.9
    p = nn.Parameter(torch.zeros(*shape))
    opt = build_optimizer([(NAME, p)], _cfg("rgp", rank=cap, oversampling=over, rank_energy=energy, min_rank=1))
    p.grad = g
    opt.step()
    side = P.choose_side(shape)
    a = g.t() if side == "right" else g               # the basis spans a's columns
    omega = P.sketch_matrix(a.shape[1], cap + over, NAME, 0)
    q = torch.linalg.qr(a @ omega).Q
    want = _ref_energy_rank(torch.linalg.svdvals(q.t() @ a), energy, cap, 1)
    assert 1 < want < cap
    assert opt.current_ranks() == {NAME: want}
    assert opt.state[p]["basis"].shape[1] == want


def test_adaptive_rank_is_deterministic_and_grows_back():
    """Same gradients, same ranks (two optimizers); a flatter gradient at a later refresh raises the rank again,
    the moments padded with zeros for the new directions ("keep")."""
    ranks = []
    for _ in range(2):
        p = nn.Parameter(torch.zeros(64, 48))
        opt = build_optimizer([(NAME, p)], _cfg("rgp", rank=16, rank_energy=0.9, min_rank=2))
        seq = []
        for t, decay in enumerate([0.5, 0.5, 0.95, 0.95]):
            p.grad = _grad(64, 48, seed=t, decay=decay)
            opt.step()
            seq.append(opt.current_ranks()[NAME])
        ranks.append(seq)
        assert opt.state[p]["exp_avg"].shape == (64, seq[-1])
    assert ranks[0] == ranks[1]
    assert ranks[0][2] > ranks[0][1], ranks[0]
    m = torch.randn(5, 3)
    assert torch.equal(P.resize_moment(m, 5, "right"), torch.cat([m, torch.zeros(5, 2)], 1))
    assert torch.equal(P.resize_moment(m.t(), 5, "left"), torch.cat([m.t(), torch.zeros(2, 5)], 0))


# --------------------------------------------------------------------------------------------- basis dtypes

@pytest.mark.parametrize("method", ["galore", "rgp"])
def test_bf16_basis_is_the_fp32_basis_rounded(method):
    g = _grad(64, 40, seed=5)
    bases = {}
    for dtype in ("float32", "bfloat16"):
        p = nn.Parameter(torch.zeros(64, 40))
        opt = build_optimizer([(NAME, p)], _cfg(method, rank=8, basis_dtype=dtype))
        p.grad = g
        opt.step()
        bases[dtype] = opt.state[p]["basis"]
    assert bases["bfloat16"].dtype == torch.bfloat16
    assert torch.equal(bases["bfloat16"], bases["float32"].to(torch.bfloat16))


def test_int8_basis_round_trip_error_is_bounded():
    basis = P.exact_basis(torch.randn(300, 200, generator=torch.Generator().manual_seed(6)), 32, "right")
    codes, scale = P.quantize_basis(basis, "int8")
    assert codes.dtype == torch.int8 and codes.shape == basis.shape and scale.shape == (32,)
    back = P.dequantize_basis(codes, scale)
    col_absmax = basis.abs().amax(dim=0)
    err = (back - basis).abs()
    assert (err <= col_absmax / 254 * (1 + 1e-5) + 1e-9).all()            # half a code step, per column
    assert ((back.t() @ back) - torch.eye(32)).abs().max() < 0.05             # still nearly orthonormal
    z, s = P.quantize_basis(torch.zeros(10, 2), "int8")                      # an all-zero column: no NaN
    assert torch.equal(P.dequantize_basis(z, s), torch.zeros(10, 2))


def test_int8_basis_step_equals_reference_with_the_dequantized_basis():
    """The update projects and back-projects with codes x scale in fp32 (plain torch reference, first step)."""
    cfg = _cfg("galore", rank=6, basis_dtype="int8", weight_decay=0.0)
    p = nn.Parameter(torch.randn(50, 30) * 0.1)
    p0 = p.detach().clone()
    g = _grad(50, 30, seed=7)
    opt = build_optimizer([(NAME, p)], cfg)
    p.grad = g
    opt.step()
    st = opt.state[p]
    assert st["basis"].dtype == torch.int8
    q = st["basis"].float() * st["basis_scale"]
    low = g @ q
    b1, b2 = cfg.beta1, cfg.beta2
    m, v = (1 - b1) * low, (1 - b2) * low * low
    want = p0 - cfg.lr * math.sqrt(1 - b2) / (1 - b1) * cfg.scale * ((m / (v.sqrt() + cfg.eps)) @ q.t())
    torch.testing.assert_close(p.detach(), want, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------- state bytes

def _real_bytes(opt):
    return tensor_bytes(list(opt.state.values()))


@pytest.mark.parametrize("name", ["rgp", "rgp8bit"])
@pytest.mark.parametrize("basis_dtype", ["float32", "bfloat16", "int8"])
def test_state_bytes_shrink_with_the_rank(name, basis_dtype):
    """Real tensor bytes after each refresh of a decaying run equal the layout at that rank; the first equals
    optim.adam.state_bytes at the start rank (the planner's figure: the peak)."""
    model = _model()
    cfg = _cfg(name, rank=64, rank_decay=2.0, min_rank=4, basis_dtype=basis_dtype)
    opt = build_optimizer(model, cfg)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    low_names = opt.param_groups[0]["names"]
    per_value = {"float32": 4, "bfloat16": 2, "int8": 1}[basis_dtype]

    def expected(r):
        total = 0
        for n, (m, k) in ((n, shapes[n]) for n in low_names):
            rows, cols = (k, m) if m >= k else (m, k)       # std side: basis rows = the smaller dimension
            total += rows * r * per_value + (4 * r if basis_dtype == "int8" else 0)
            if name == "rgp8bit" and 64 * cols >= 4096:     # 8-bit format decided at the start rank (all here)
                total += 2 * r * cols + 2 * 4 * math.ceil(r * cols / 256)
            else:
                total += 2 * 4 * r * cols
        rest = [n for n in shapes if n not in low_names]
        return total + sum(state_bytes(n, shapes[n], cfg) for n in rest)

    measured = []
    for k, r in enumerate([64, 32, 16, 8]):
        _train(model, opt, max(2 * k - 1, 0), 2 * k + 1)   # up to the refresh step of rank r (steps 0, 2, 4, 6)
        assert set(opt.current_ranks().values()) == {r}
        measured.append(_real_bytes(opt))
        assert measured[-1] == expected(r), (r, measured[-1], expected(r))
    assert measured[0] == sum(state_bytes(n, s, cfg) for n, s in shapes.items())
    assert measured == sorted(measured, reverse=True) and measured[-1] < measured[0]


# --------------------------------------------------------------------------------------------- save / restore

RESUME_CASES = [
    ("rgp", dict(rank_decay=2.0, min_rank=2)),
    ("galore8bit", dict(rank_energy=0.9, min_rank=2, moments_on_refresh="project")),
    ("rgp8bit", dict(rank_decay=2.0, rank_energy=0.8, min_rank=2, basis_dtype="int8")),
    ("galore", dict(rank_decay=1.5, basis_dtype="bfloat16", moments_on_refresh="project")),
]


@pytest.mark.parametrize("name,kw", RESUME_CASES, ids=[c[0] + "-" + "-".join(c[1]) for c in RESUME_CASES])
def test_save_load_mid_run_is_bit_identical(name, kw, tmp_path):
    """7 steps straight == 3 steps, save (bases and moments already shrunk), load into a fresh optimizer that
    has stepped at the start rank (its state is replaced, not copied into), 4 more steps."""
    cfg = _cfg(name, rank=16, **kw)
    ref = _model()
    ref_opt = build_optimizer(ref, cfg)
    _train(ref, ref_opt, 0, 7)

    model = _model()
    opt = build_optimizer(model, cfg)
    _train(model, opt, 0, 3)
    assert min(opt.current_ranks().values()) < 16
    torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, tmp_path / "ckpt.pt")
    blob = torch.load(tmp_path / "ckpt.pt", weights_only=True)

    model2 = _model(seed=5)
    opt2 = build_optimizer(model2, cfg)
    _train(model2, opt2, 0, 1)                      # start-rank state, to be replaced
    model2.load_state_dict(blob["model"])
    opt2.load_state_dict(blob["optim"])
    assert opt2.current_ranks() == opt.current_ranks()
    _train(model2, opt2, 3, 7)
    for (n, a), (_, b) in zip(ref.named_parameters(), model2.named_parameters()):
        assert torch.equal(a, b), n
    assert opt2.current_ranks() == ref_opt.current_ranks()


def test_load_refuses_a_basis_that_does_not_fit():
    model = _model()
    opt = build_optimizer(model, _cfg("rgp", rank=8, rank_decay=2.0, min_rank=2))
    _train(model, opt, 0, 1)
    sd = opt.state_dict()
    st = next(s for s in sd["state"].values() if "basis" in s)
    st["basis"] = torch.zeros(st["basis"].shape[0], 12)            # more columns than optim.rank
    with pytest.raises(ValueError, match="basis"):
        build_optimizer(model, _cfg("rgp", rank=8, rank_decay=2.0, min_rank=2)).load_state_dict(sd)


# --------------------------------------------------------------------------------------------- config

@pytest.mark.parametrize("kw,match", [
    (dict(rank_decay=0.5), "optim.rank_decay must be >= 1"),
    (dict(rank_decay=float("nan")), "optim.rank_decay must be >= 1"),
    (dict(rank_energy=1.0), r"optim.rank_energy must be in \[0, 1\)"),
    (dict(rank_energy=-0.1), r"optim.rank_energy must be in \[0, 1\)"),
    (dict(min_rank=0), "optim.min_rank must be >= 1"),
    (dict(rank_decay=2.0, min_rank=16), "set optim.min_rank <= optim.rank"),
    (dict(basis_dtype="fp8"), "unknown optim.basis_dtype 'fp8'; use one of float32, bfloat16, int8"),
    (dict(lowrank_comm=True, rank_decay=2.0), "rank_decay=2.0 is not supported with optim.lowrank_comm yet; turn one off"),
    (dict(lowrank_comm=True, rank_energy=0.9), "rank_energy=0.9 is not supported with optim.lowrank_comm"),
    (dict(lowrank_comm=True, basis_dtype="int8"), "basis_dtype='int8' is not supported with optim.lowrank_comm"),
])
def test_config_errors_are_one_line(kw, match):
    with pytest.raises(ValueError, match=match) as info:
        validate_optim_config(_cfg("rgp", **kw))
    assert "\n" not in str(info.value)


def test_defaults_change_nothing():
    """rank_decay 1, rank_energy 0, float32 bases: the state layout and the trajectory of before (min_rank unused)."""
    a, b = _model(), _model()
    oa = build_optimizer(a, _cfg("rgp8bit", rank=8))
    ob = build_optimizer(b, _cfg("rgp8bit", rank=8, min_rank=64))   # ignored while decay and energy are off
    _train(a, oa, 0, 3)
    _train(b, ob, 0, 3)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    assert set(oa.current_ranks().values()) == {8}


# --------------------------------------------------------------------------------------------- metrics

def test_train_logs_the_ranks(corpus_dir, spm_path, tmp_path, monkeypatch):
    """train.py writes "ranks" {mean, min, max} in every train record and the per-matrix dict in eval records, from
    the optimizer's current_ranks() (here the world-size-1 wrapper's inner optimizer's)."""
    import json

    import train
    from optim.sharded import ShardedOptimizer
    from tests.helpers import small_run
    if not hasattr(ShardedOptimizer, "current_ranks"):
        monkeypatch.setattr(ShardedOptimizer, "current_ranks", lambda self: self.inner.current_ranks(), raising=False)
    out = tmp_path / "run"
    assert train.main(small_run(corpus_dir, spm_path, out, "--optim.name=rgp", "--optim.rank=16",
                                "--optim.update_proj_gap=2", "--optim.rank_decay=2", "--optim.min_rank=4",
                                "--train.max_steps=6", "--train.eval_every=6", "--train.save_every=0")) == 0
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_recs = {r["step"]: r["ranks"] for r in recs if "loss" in r}
    # steps 1..6 after the refreshes at optimizer steps 0, 2, 4: ranks 16, 8, 4
    assert [train_recs[s]["max"] for s in range(1, 7)] == [16, 16, 8, 8, 4, 4]
    assert all(r["min"] == r["max"] == r["mean"] for r in train_recs.values())
    (ev,) = [r for r in recs if "eval_loss" in r]
    assert len(ev["ranks_per_matrix"]) == 2 * 7 and set(ev["ranks_per_matrix"].values()) == {4}
    assert train.rank_summary(object()) == {}


@pytest.mark.parametrize("name", ["galore8bit", "rgp"])
def test_new_paths_never_use_the_default_device(name):
    """Decaying and adaptive refreshes, 8-bit resizes and int8 bases under torch.device("meta") as the default
    device (docs/design.md, "Testing GPU code on a CPU"): a tensor made without an explicit device would land on
    meta and fail against the real ones."""
    p = nn.Parameter(torch.zeros(512, 64))
    opt = build_optimizer([(NAME, p)], _cfg(name, rank=16, rank_decay=2.0, rank_energy=0.95, min_rank=2,
                                            basis_dtype="int8", moments_on_refresh="project"))
    for t in range(5):
        p.grad = _grad(512, 64, seed=t, decay=0.9)
        with torch.device("meta"):
            opt.step()
    st = opt.state[p]
    assert all(v.device.type == "cpu" for v in st.values() if torch.is_tensor(v))
    assert st["basis"].dtype == torch.int8 and opt.current_ranks()[NAME] <= 4
