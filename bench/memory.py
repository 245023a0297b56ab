"""Optimizer-state bytes per optimizer and model size, measured from the real state tensors, JSON lines.

    {"bench": "memory", "model": "1b", "optim": "galore", "rank": 512, "state_bytes": ..., "analytic_bytes": ...,
     "analytic_bf16_bytes": ..., "vs_adamw": ..., "method": "one_layer_scaled"}

How the states are measured (vocab 32000, LLaMA shapes of configs/models):
* method "full": the whole model is built, every parameter gets a gradient, the optimizer takes one step
  (which allocates every state tensor through the normal code path), and the bytes of every tensor in
  `optimizer.state` are summed (`numel * element_size`; Python ints such as "step" are not counted).
* method "one_layer_scaled": the same, on a model with ONE transformer layer (same dim, intermediate size,
  vocab); state bytes = non-layer bytes + n_layers * one layer's bytes.  Every layer has identical parameter
  shapes, so this is exact - the 60M (and, with --full, larger) models check it against "full" (a line
  {"bench": "memory_check", ...}).  This is how 350M and 1B are measured by default (1B fp32 weights +
  gradients + states would need >15 GB and minutes of SVDs on this CPU).
* GaLore's bases are computed by the randomized path here (`--exact-svd` to use the SVD): the state tensors'
  shapes and dtypes are identical, only the basis values differ, and this saves minutes of SVD time.

analytic_bytes: the closed-form count for the dtypes we store (fp32 moments; 8-bit: 1 byte per value + one fp32
absmax per 256-value block, tensors under 4096 elements fp32 as in bnb; projected (m, n) at rank r:
moments 2 * max(m, n) * r, basis min(m, n) * r, basis fp32).  analytic_bf16_bytes: the GaLore paper's
Table 6 accounting (all states in BF16, 2 bytes); the paper lists 1B: AdamW 5.20G vs GaLore 1.78G (rank 512).

    python bench/memory.py            # 60m full + all four sizes scaled (~1-3 min here)
    python bench/memory.py --full     # also 130m and 350m fully measured (slow: minutes of projections)
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from config import OptimConfig  # noqa: E402
from model import build_model, size_table  # noqa: E402
from optim import OPTIMIZERS, build_optimizer  # noqa: E402
from optim.adam import is_projected, projects, state_bytes  # noqa: E402
from optim.sharded import tensor_bytes  # noqa: E402

RANKS = {"60m": 128, "130m": 256, "350m": 256, "1b": 512}
VOCAB = 32000
PAPER_TABLE6 = {("1b", "adamw"): "5.20G", ("1b", "galore"): "1.78G"}


def emit(**kw):
    print(json.dumps(kw), flush=True)


def measure(size: str, name: str, n_layers: int | None, exact_svd: bool) -> tuple[int, int]:
    """(state bytes, number of layers of the measured model)."""
    torch.manual_seed(0)
    model = build_model(size, VOCAB, 256, **({"n_layers": n_layers} if n_layers else {}))
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    cfg = OptimConfig(name=name, rank=RANKS[size], update_proj_gap=200)
    opt = build_optimizer(model, cfg)
    if name.startswith("galore") and not exact_svd:
        for g in opt.param_groups:
            if g["kind"] == "lowrank":
                g["method"] = "rsvd"      # same state shapes/dtypes, no minutes of SVD (see module docstring)
    opt.step()
    out = tensor_bytes(list(opt.state.values())), model.args.n_layers
    del opt, model
    gc.collect()
    return out


def shapes(size: str) -> list[tuple[str, tuple[int, ...]]]:
    model = build_model(size, VOCAB, 256, n_layers=1)
    t = size_table(size)
    out = []
    for n, p in model.named_parameters():
        if n.startswith("layers.0."):
            out += [(n.replace("layers.0.", f"layers.{i}."), tuple(p.shape)) for i in range(t["n_layers"])]
        else:
            out.append((n, tuple(p.shape)))
    return out


def analytic(size: str, name: str, bytes_per_value: int | None = None) -> int:
    """State bytes by formula: optim.adam.state_bytes (the layout we store), or with bytes_per_value=2 the
    paper's BF16 accounting (every moment and basis value 2 bytes; 32-bit variants only)."""
    cfg = OptimConfig(name=name, rank=RANKS[size])
    if not bytes_per_value:
        return sum(state_bytes(n, shp, cfg) for n, shp in shapes(size))
    r, total = RANKS[size], 0
    for n, shp in shapes(size):
        if projects(name) and is_projected(n, shp):
            m, k = shp
            total += (2 * max(m, k) * r + min(m, k) * r) * bytes_per_value   # two moments + basis
        else:
            total += 2 * math.prod(shp) * bytes_per_value
    return total


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true", help="also measure 130m and 350m on the whole model")
    ap.add_argument("--exact-svd", action="store_true", help="compute GaLore bases by SVD (slow)")
    ap.add_argument("--sizes", default="60m,130m,350m,1b")
    args = ap.parse_args(argv)
    full_sizes = {"60m", "130m", "350m"} if args.full else {"60m"}
    for size in args.sizes.split(","):
        adamw_bytes = None
        for name in OPTIMIZERS:
            one, _ = measure(size, name, 1, args.exact_svd)
            two, _ = measure(size, name, 2, args.exact_svd)
            per_layer, nonlayer = two - one, 2 * one - two
            n_layers = size_table(size)["n_layers"]
            scaled = nonlayer + n_layers * per_layer
            method, measured = "one_layer_scaled", scaled
            if size in full_sizes:
                measured, _ = measure(size, name, None, args.exact_svd)
                method = "full"
                emit(bench="memory_check", model=size, optim=name, full_bytes=measured, scaled_bytes=scaled,
                     equal=measured == scaled)
            if name == "adamw":
                adamw_bytes = measured
            line = dict(bench="memory", model=size, optim=name, rank=RANKS[size] if name[:5] != "adamw" else None,
                        state_bytes=measured, analytic_bytes=analytic(size, name),
                        state_gib=round(measured / 2**30, 3), vs_adamw=round(measured / adamw_bytes, 3),
                        method=method)
            if not name.endswith("8bit"):
                line["analytic_bf16_bytes"] = analytic(size, name, 2)
            if (size, name) in PAPER_TABLE6:
                line["paper_table6"] = PAPER_TABLE6[(size, name)]
            emit(**line)


if __name__ == "__main__":
    main()
