"""Projection benchmarks, JSON lines on stdout (figures only, no pass/fail).

1. One basis refresh by exact SVD (GaLore) vs randomized SVD (RGP, k = r + 2) at the recipe ranks:
   {"bench": "refresh", "shape": [m, n], "rank": r, "svd_s": ..., "rsvd_s": ..., "speedup": ...,
    "rsvd_pow2_s": ..., "energy_rsvd": ..., "energy_rsvd_pow2": ...}
   energy_* = ||proj(G)||_F^2 / (sum of the top-r squared singular values): 1.0 means the randomized basis
   captures as much of the gradient as the SVD's.
2. Optimizer step time of every optimizer on the full 60M model (vocab 32000), side by side in one run:
   {"bench": "step", "optim": name, "step_s": ordinary step, "adamw_step_s": our adamw's, "refresh_step_s":
    a step that refreshes the bases, "amortized_step_s_T200": (199 * step_s + refresh_step_s) / 200, ...}
   plus reference lines for torch.optim.AdamW (default foreach) and galore_torch.GaLoreAdamW.
3. Our AdamW step vs torch.optim.AdamW, interleaved round by round (also run by --only step):
   {"bench": "adamw_step", "ours_foreach_s", "ours_per_param_s", "torch_foreach_s", "foreach_vs_torch", ...}

    python bench/projection.py            # full: 60M/350M/1B shapes, all optimizers (~4-5 min here)
    python bench/projection.py --quick    # 60M/350M shapes, fewer optimizers and repeats (~1 min)
    python bench/projection.py --only adamw   # our AdamW step vs torch's, interleaved (~30 s)
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from config import OptimConfig  # noqa: E402
from optim import OPTIMIZERS, build_optimizer  # noqa: E402
from optim import projection as P  # noqa: E402

SHAPES = [((512, 1376), 128, "60m"), ((1024, 2736), 256, "350m"), ((2048, 2048), 512, "1b"),
          ((2048, 5461), 512, "1b")]


def emit(**kw):
    print(json.dumps(kw), flush=True)


def gradient_like(m, n, seed=0):
    """A gradient-like matrix: a decaying low-rank part plus noise (cheap to build at 1B sizes)."""
    g = torch.Generator().manual_seed(seed)
    k = min(m, n, 256)
    a = torch.randn(m, k, generator=g) * torch.logspace(0, -2, k)
    return a @ torch.randn(k, n, generator=g) / k ** 0.5 + 1e-3 * torch.randn(m, n, generator=g)


def timed(fn, repeats=1):
    times = []
    out = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def bench_refresh(quick: bool):
    for (m, n), r, size in SHAPES:
        if quick and size == "1b":
            continue
        g = gradient_like(m, n)
        side = P.choose_side((m, n))
        reps = 1 if m * n > 4e6 else 2
        svd_s, exact = timed(lambda: P.exact_basis(g, r, side), reps)
        rsvd_s, rq = timed(lambda: P.randomized_basis(g, r, side, 2, 0, name="w", step=0), reps)
        pow_s, pq = timed(lambda: P.randomized_basis(g, r, side, 2, 2, name="w", step=0), reps)
        top = P.project(g, exact, side).square().sum().item()
        emit(bench="refresh", model=size, shape=[m, n], rank=r, side=side, svd_s=round(svd_s, 4),
             rsvd_s=round(rsvd_s, 4), speedup=round(svd_s / rsvd_s, 2), rsvd_pow2_s=round(pow_s, 4),
             speedup_pow2=round(svd_s / pow_s, 2),
             energy_rsvd=round(P.project(g, rq, side).square().sum().item() / top, 5),
             energy_rsvd_pow2=round(P.project(g, pq, side).square().sum().item() / top, 5))


def _model_with_grads(seed=0):
    from model import build_model
    torch.manual_seed(seed)
    model = build_model("60m", 32000, 256)
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen) * 1e-3
    return model


def step_times(opt, period: int, ordinary_reps: int):
    """(ordinary step s, refresh step s): step 0 (init + first refresh) is a warm-up; steps 1..period-1 are
    ordinary; step `period` refreshes every basis."""
    opt.step()                                           # step 0: state allocation + first refresh
    ordinary = []
    for _ in range(min(ordinary_reps, period - 1)):
        t0 = time.perf_counter()
        opt.step()
        ordinary.append(time.perf_counter() - t0)
    for _ in range(period - 1 - len(ordinary)):
        opt.step()
    t0 = time.perf_counter()
    opt.step()                                           # step `period`: refresh
    return min(ordinary), time.perf_counter() - t0          # min: least disturbed by other load


def bench_step(quick: bool):
    names = ["adamw", "galore", "rgp"] if quick else list(OPTIMIZERS)
    reps = 2 if quick else 3
    period = reps + 1
    model = _model_with_grads()
    named = list(model.named_parameters())
    init = [p.detach().clone() for p in model.parameters()]
    results = {}
    for name in names:
        for p, x in zip(model.parameters(), init):
            p.data.copy_(x)
        cfg = OptimConfig(name=name, lr=1e-3, rank=128, update_proj_gap=period, scale=0.25)
        opt = build_optimizer(named, cfg)
        s, rs = step_times(opt, period, reps)
        results[name] = (s, rs if name not in ("adamw", "adamw8bit") else s)
        del opt
    base = results["adamw"][0]
    for name, (s, rs) in results.items():
        emit(bench="step", model="60m", optim=name, step_s=round(s, 4), adamw_step_s=round(base, 4),
             refresh_step_s=round(rs, 4), amortized_step_s_T200=round((199 * s + rs) / 200, 4),
             step_vs_adamw=round(s / base, 2), refresh_vs_adamw=round(rs / base, 2),
             amortized_vs_adamw=round((199 * s + rs) / 200 / base, 2))
    # references: torch's own AdamW (default implementation) and the galore-torch package
    params = [p for _, p in named]
    topt = torch.optim.AdamW(params, lr=1e-3)
    s, _ = step_times(topt, period, reps)
    emit(bench="step", model="60m", optim="torch.optim.AdamW", step_s=round(s, 4), adamw_step_s=round(base, 4),
         refresh_step_s=round(s, 4), amortized_step_s_T200=round(s, 4), step_vs_adamw=round(s / base, 2))
    del topt
    if not quick:
        from galore_torch import GaLoreAdamW
        low = [p for n, p in named if p.ndim == 2 and "embed" not in n and "lm_head" not in n]
        rest = [p for n, p in named if not (p.ndim == 2 and "embed" not in n and "lm_head" not in n)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gopt = GaLoreAdamW([{"params": rest}, {"params": low, "rank": 128, "update_proj_gap": period,
                                                   "scale": 0.25, "proj_type": "std"}], lr=1e-3,
                               no_deprecation_warning=True)
        s, rs = step_times(gopt, period, reps)
        emit(bench="step", model="60m", optim="galore_torch.GaLoreAdamW", step_s=round(s, 4),
             adamw_step_s=round(base, 4), refresh_step_s=round(rs, 4),
             amortized_step_s_T200=round((199 * s + rs) / 200, 4), step_vs_adamw=round(s / base, 2),
             refresh_vs_adamw=round(rs / base, 2), amortized_vs_adamw=round((199 * s + rs) / 200 / base, 2))


def bench_adamw_side_by_side(rounds: int):
    """Our plain AdamW step against torch.optim.AdamW (foreach, its default), interleaved round by round on
    identical 60M models and gradients: ours as `step()` runs it (multi-tensor) and as the per-parameter loop
    it replaced (`step_param` for every parameter, still the layer-wise path). Medians of times and of the
    per-round ratios; a round's three steps run back to back, so load changes hit all three alike."""
    models = [_model_with_grads() for _ in range(3)]
    cfg = OptimConfig(name="adamw", lr=1e-3)
    ours = build_optimizer(list(models[0].named_parameters()), cfg)
    loop = build_optimizer(list(models[1].named_parameters()), cfg)
    ref = torch.optim.AdamW(list(models[2].parameters()), lr=1e-3)
    loop_params = [p for g in loop.param_groups for p in g["params"]]
    runs = {"ours_foreach": ours.step, "ours_per_param": lambda: [loop.step_param(p) for p in loop_params],
            "torch_foreach": ref.step}
    for fn in runs.values():       # step 1 allocates the state
        fn()
    times = {k: [] for k in runs}
    for r in range(rounds):
        order = list(runs) if r % 2 == 0 else list(reversed(runs))
        for k in order:
            t0 = time.perf_counter()
            runs[k]()
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = lambda a, b: statistics.median(x / y for x, y in zip(times[a], times[b]))  # noqa: E731
    emit(bench="adamw_step", model="60m", rounds=rounds, **{f"{k}_s": round(v, 4) for k, v in med.items()},
         foreach_vs_torch=round(ratio("ours_foreach", "torch_foreach"), 3),
         per_param_vs_torch=round(ratio("ours_per_param", "torch_foreach"), 3))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller shapes, fewer optimizers and repeats")
    ap.add_argument("--only", choices=["refresh", "step", "adamw"], help="run one of the benchmarks")
    args = ap.parse_args(argv)
    emit(bench="env", torch=torch.__version__, threads=torch.get_num_threads(), quick=args.quick)
    if args.only in (None, "refresh"):
        bench_refresh(args.quick)
    if args.only in (None, "step"):
        bench_step(args.quick)
    if args.only in (None, "step", "adamw"):
        bench_adamw_side_by_side(5 if args.quick else 15)


if __name__ == "__main__":
    main()
