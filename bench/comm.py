"""Bytes on the wire per rank per optimizer step: the sharded optimizer's collectives against DDP and ZeRO-2.

    python bench/comm.py                       # 60M and 1B at world sizes 2, 8, 64 (fake process group)
    python bench/comm.py --models 60m --worlds 2

The sharded optimizer's own code path runs (`sync_gradients`, `clip_grad_norm_`, `broadcast_weights`, i.e. a
step without the optimizer math, which moves no bytes) as rank 0 of a `fake` process group of the given world
size, with a `CommLedger` attached (optim/comm.py: ring-algorithm bytes per rank). Every rank takes part in
every collective of these modes, so rank 0's count is every rank's. tests/distributed check the ledger of a
real 2-rank gloo run against this one.

One JSON line per (model, world, mode, communication dtype):
  {"bench": "comm", "model", "world", "optim", "mode": "stage1" | "stage2" | "lowrank" | "lowrank_update", "comm_dtype",
   "grad_bytes_per_rank", "weight_bytes_per_rank", "other_bytes_per_rank" (flags, norms),
   "bytes_per_rank" (their sum), "ddp_bf16_bytes", "zero2_bf16_bytes", "vs_ddp_bf16", "vs_zero2_bf16"}
Modes: stage1 and stage2 reduce-scatter every gradient bucket (slices of the element-wise parameters, rounds
of W equal-size projected matrices; leftover matrices are reduced to their owner) and all-gather the weights
back: ZeRO's bytes (optim/ownership.py); stage 1 once per optimizer step, stage 2 every micro-batch (the same
at accumulation 1, which this counts). lowrank (optim.lowrank_comm) reduces projected gradients G_i @ Q to the
owner instead (the other parameters as stage 2), amortised over T = 200 steps whose first refreshes the bases
(RGP: sketches Y and B reduced, Q and the new basis broadcast). lowrank_update (optim.lowrank_update as well):
owners broadcast each projected matrix's low-rank update (r x n in the wire dtype, plus two fp64 scalars)
instead of its weights, counted as weight bytes.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from config import OptimConfig  # noqa: E402
from model import build_model  # noqa: E402
from optim.comm import CommLedger, ddp_bytes, zero2_bytes  # noqa: E402
from optim.sharded import ShardedOptimizer  # noqa: E402

RANKS = {"60m": 128, "1b": 512, "tiny": 64}
MODES = {"stage1": "allreduce", "stage2": "reduce", "lowrank": "reduce", "lowrank_update": "reduce"}
T = 200                                   # the recipes' refresh interval: lowrank bytes are amortised over it


def emit(**kw):
    print(json.dumps(kw), flush=True)


def count_step(model, world: int, optim: str, rank: int, mode: str, comm_dtype: str) -> dict:
    """Ledger totals (bytes by tag) of one optimizer step of rank 0 of `world` (fake process group); for the
    lowrank mode the average over T steps of which the first refreshes the bases."""
    from torch.testing._internal.distributed.fake_pg import FakeStore
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    opt = None
    try:
        cfg = OptimConfig(name=optim, rank=rank, comm_dtype=comm_dtype, lowrank_comm=mode.startswith("lowrank"),
                          lowrank_update=mode == "lowrank_update")
        opt = ShardedOptimizer(list(model.named_parameters()), cfg, grad_mode=MODES[mode],
                               build_inner=lambda named, cfg, shapes: None)      # no optimizer math: it sends nothing

        def one_step():
            for p in model.parameters():      # a full gradient on every rank (the step frees or moves some)
                p.grad = torch.zeros_like(p)
            opt.ledger = CommLedger(world)
            opt.sync_gradients()
            opt.clip_grad_norm_(1.0)
            if opt.lowrank_update:            # what step() sends besides the optimizer math
                opt.bases.update(opt._pending)
                opt._exchange_updates(list(opt.projected))
            opt.broadcast_weights()
            return opt.ledger.totals()["by_tag"]

        first = one_step()
        if not mode.startswith("lowrank"):
            return first
        opt.bases.update(opt._pending)        # what step() installs; then an ordinary (non-refresh) step
        opt.proj_steps = {n: 1 for n in opt.proj_steps}
        opt.zero_grad()
        steady = one_step()
        return {k: (first.get(k, 0.0) + (T - 1) * steady.get(k, 0.0)) / T for k in set(first) | set(steady)}
    finally:
        if opt is not None:
            opt.remove_hooks()
        dist.destroy_process_group()
        import gc
        gc.collect()                          # the previous wrapper's masters and copies (GBs at 1B) go now


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="60m,1b")
    ap.add_argument("--worlds", default="2,8,64")
    ap.add_argument("--optim", default="rgp")
    args = ap.parse_args(argv)
    for size in args.models.split(","):
        torch.manual_seed(0)
        model = build_model(size, 32000, 256).to(torch.bfloat16)      # the GPU recipes' bf16 weights
        numel = sum(p.numel() for p in model.parameters())
        for world in (int(w) for w in args.worlds.split(",")):
            ddp, zero2 = ddp_bytes(numel, world, 2), zero2_bytes(numel, world, 2)
            for mode in MODES:
                for comm_dtype in ("float32", "bfloat16"):
                    t = count_step(model, world, args.optim, RANKS[size], mode, comm_dtype)
                    # refresh-step sketches, full gradients and bases count as gradient traffic
                    grad = t.get("grads", 0.0) + t.get("refresh", 0.0) + t.get("bases", 0.0)
                    weights = t.get("weights", 0.0) + t.get("updates", 0.0)   # lowrank_update: updates, not weights
                    other = sum(v for k, v in t.items()
                                if k not in ("grads", "weights", "refresh", "bases", "updates"))
                    total = grad + weights + other
                    emit(bench="comm", model=size, params=numel, world=world, optim=args.optim, mode=mode,
                         comm_dtype=comm_dtype, grad_bytes_per_rank=int(grad), weight_bytes_per_rank=int(weights),
                         other_bytes_per_rank=int(other), bytes_per_rank=int(total), ddp_bf16_bytes=int(ddp),
                         zero2_bf16_bytes=int(zero2), vs_ddp_bf16=round(total / ddp, 3),
                         vs_zero2_bf16=round(total / zero2, 3))


if __name__ == "__main__":
    main()
