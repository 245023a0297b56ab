"""Sharded-optimizer figures (JSON lines on stdout; no pass/fail on time).

1. Per-rank optimizer-state bytes and basis-refresh time (the inner optimizer's step at step 0, when
   every owned projected matrix computes its basis) for galore and rgp on the 60M LLaMA (vocab 32000),
   with 1 process and with 2 (launched here through `torchrun --nproc_per_node=2`).
2. The layout of the 1B model on 8 ranks (optim/ownership.py; shapes only, nothing allocated): per-rank
   state, refresh cost and owned values (what each rank sends and receives), max/mean imbalance of each.

    python bench/sharding.py                      # everything
    python bench/sharding.py --skip-2proc         # no torchrun part
    torchrun --nproc_per_node=2 bench/sharding.py --worker   # the 2-process part alone
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from config import OptimConfig  # noqa: E402
from model.llama import build_model  # noqa: E402
from optim.ownership import layout_summary, plan_layout  # noqa: E402
from optim.sharded import ShardedOptimizer  # noqa: E402

NAMES = ("galore", "rgp")


def emit(**rec):
    print(json.dumps(rec), flush=True)


def cfg_for(name: str, rank: int) -> OptimConfig:
    return OptimConfig(name=name, lr=0.01, rank=rank, update_proj_gap=200)


def refresh_figures(size: str = "60m", rank: int = 128) -> None:
    """State bytes and refresh time of this rank (world size from torch.distributed, 1 if not initialised)."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    me = dist.get_rank() if dist.is_initialized() else 0
    torch.manual_seed(0)
    model = build_model(size, 32000, 256)
    for name in NAMES:
        opt = ShardedOptimizer(list(model.named_parameters()), cfg_for(name, rank))
        g = torch.Generator().manual_seed(1)
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=g) * 1e-3
        opt.sync_gradients()
        t0 = time.perf_counter()
        if opt.inner is not None:
            opt.inner.step()                     # step 0: every owned projected matrix computes its basis
        refresh = time.perf_counter() - t0
        opt.zero_grad()
        emit(bench="sharding/refresh", model=size, optimizer=name, rank_r=rank, world_size=world, rank=me,
             owned=len(opt.owned), state_bytes=opt.state_bytes(), refresh_s=round(refresh, 3))
        del opt


def two_process_part(size: str, rank: int) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = ["torchrun", "--nproc_per_node=2", f"--master_port={port}", str(Path(__file__).resolve()),
           "--worker", f"--size={size}", f"--rank={rank}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1200,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    if proc.returncode != 0:
        raise SystemExit(f"2-process part failed:\n{proc.stderr[-3000:]}")
    recs = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    for r in recs:
        print(json.dumps(r), flush=True)
    return recs


def plan_figures(size: str = "1b", world: int = 8, rank: int = 512) -> None:
    with torch.device("meta"):
        model = build_model(size, 32000, 256)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    for name in ("adamw", "galore", "rgp", "galore8bit"):
        cfg = cfg_for(name, rank)
        s = layout_summary(plan_layout(shapes, world, cfg), shapes, cfg)
        emit(bench="sharding/layout", model=size, optimizer=name, rank_r=rank, world_size=world,
             state_bytes_per_rank=[int(b) for b in s["state_bytes"]], numel_per_rank=s["numel"],
             state_imbalance=round(s["state_imbalance"], 4), cost_imbalance=round(s["cost_imbalance"], 4),
             numel_imbalance=round(s["numel_imbalance"], 4))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", action="store_true", help="run the refresh part under torchrun")
    ap.add_argument("--skip-2proc", action="store_true")
    ap.add_argument("--size", default="60m")
    ap.add_argument("--rank", type=int, default=128)
    args = ap.parse_args()
    if args.worker:
        dist.init_process_group("gloo")
        torch.set_num_threads(1)
        refresh_figures(args.size, args.rank)
        dist.barrier()
        dist.destroy_process_group()
        return
    torch.set_num_threads(1)        # same per-process threads as the 2-process run, for a fair time ratio
    one = []
    import contextlib
    import io
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        refresh_figures(args.size, args.rank)
    for line in buf.getvalue().splitlines():
        print(line, flush=True)
        one.append(json.loads(line))
    if not args.skip_2proc:
        two = two_process_part(args.size, args.rank)
        for name in NAMES:
            base = next(r for r in one if r["optimizer"] == name)
            ranks = [r for r in two if r["optimizer"] == name]
            emit(bench="sharding/summary", model=args.size, optimizer=name,
                 state_ratio_per_rank=[round(r["state_bytes"] / base["state_bytes"], 4) for r in ranks],
                 refresh_ratio_per_rank=[round(r["refresh_s"] / base["refresh_s"], 3) for r in ranks])
    plan_figures()


if __name__ == "__main__":
    main()
