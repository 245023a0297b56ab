"""Who owns what: the layout of the sharded optimizer (docs/design.md §5).

Two kinds of ownership, because two kinds of update:
  * A projected matrix (GaLore/RGP) needs its whole 2-D gradient (an SVD or a randomized range finder), so it
    is owned whole by one rank. Matrices of equal size are taken W at a time, in the order backward produces
    them, into *rounds*: rank j owns the j-th matrix of every round, so one reduce-scatter (all-gather) of
    W equal chunks moves a round's gradients (weights) with ZeRO's byte count and no padding. The few
    matrices left over (fewer than W of a size) are *singles*, placed by `plan_ownership` and reduced to /
    broadcast from their owner.
  * Everything else (embeddings, lm_head, norms, and every parameter of a non-projected optimizer) updates
    element-wise, so it is *sliced* as ZeRO slices it: rank j owns the flat elements [j s, (j+1) s) with s a
    multiple of SLICE_ALIGN, so an 8-bit state's quantization blocks never straddle two ranks.
At world size 1 everything is whole and owned by rank 0.

Pure functions of parameter names, shapes, world size and optimizer config, so every rank computes the same
layout on its own; `run_signature` / `describe_disagreement` let the ranks check that they did (optim/sharded.py).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from optim.adam import BLOCKSIZE, is_projected, projects, state_bytes

SLICE_ALIGN = BLOCKSIZE     # bitsandbytes' blockwise-quantization block (256 values)


@dataclass
class Layout:
    """The layout of `plan_layout` (module docstring)."""
    world: int
    order: list[str]                       # every parameter, model order
    numel: dict[str, int]
    owner: dict[str, int]                  # whole parameters -> owning rank
    slice_numel: dict[str, int]            # sliced parameters -> s (rank j owns flat [j s, (j+1) s))
    rounds: list[list[str]]                # W equal-size whole matrices each; rounds[k][j] is owned by rank j
    round_of: dict[str, int]               # whole matrix -> its round
    singles: list[str]                     # whole parameters in no round

    def slice_range(self, name: str, rank: int) -> tuple[int, int]:
        """Flat [start, end) of sliced parameter `name` that `rank` owns (empty when start == end)."""
        s, n = self.slice_numel[name], self.numel[name]
        return min(rank * s, n), min((rank + 1) * s, n)

    def owns(self, name: str, rank: int) -> bool:
        if name in self.owner:
            return self.owner[name] == rank
        a, b = self.slice_range(name, rank)
        return b > a

    def share(self, name: str, rank: int) -> float:
        """The fraction of parameter `name` that `rank` owns (1 or 0 for a whole one)."""
        if name in self.owner:
            return float(self.owner[name] == rank)
        a, b = self.slice_range(name, rank)
        return (b - a) / self.numel[name]

    def plan(self) -> dict[str, int]:
        """name -> owning rank, -1 for a sliced parameter (every rank holds a slice): the checkpoint manifest's."""
        return {n: self.owner.get(n, -1) for n in self.order}


def plan_layout(shapes: dict[str, tuple], world_size: int, cfg) -> Layout:
    """The layout for parameters `shapes` (name -> shape, in model order) on `world_size` ranks (module doc)."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    order = list(shapes)
    numel = {n: math.prod(int(s) for s in shapes[n]) for n in order}
    if world_size == 1:
        return Layout(1, order, numel, {n: 0 for n in order}, {}, [], {}, list(order))
    whole = [n for n in order if projects(cfg.name) and is_projected(n, shapes[n])]
    wholes = set(whole)
    slice_numel = {n: SLICE_ALIGN * math.ceil(numel[n] / (world_size * SLICE_ALIGN))
                   for n in order if n not in wholes}
    by_size: dict[int, list[str]] = {}
    for n in reversed(whole):                       # the order backward produces gradients
        by_size.setdefault(numel[n], []).append(n)
    rounds, left = [], []
    for names in by_size.values():
        full = len(names) // world_size * world_size
        rounds += [names[i:i + world_size] for i in range(0, full, world_size)]
        left += names[full:]
    owner = {n: j for r in rounds for j, n in enumerate(r)}
    if left:
        owner.update(plan_ownership({n: shapes[n] for n in left}, world_size, cfg, allow_idle=True))
    round_of = {n: k for k, r in enumerate(rounds) for n in r}
    return Layout(world_size, order, numel, owner, slice_numel, rounds, round_of,
                  [n for n in order if n in wholes and n not in round_of])



def param_cost(name: str, shape, cfg) -> tuple[float, float]:
    """(refresh cost in flops-ish units, optimizer state bytes) of one parameter under `cfg`; the bytes are
    optim.adam.state_bytes, the layout the optimizer really allocates."""
    state = float(state_bytes(name, shape, cfg))
    if projects(cfg.name) and is_projected(name, shape):
        m, n = int(shape[0]), int(shape[1])
        if cfg.name.startswith("galore"):
            return float(m) * n * min(m, n), state                   # full SVD
        return float(m) * n * (cfg.rank + cfg.oversampling) * (1 + 2 * cfg.power_iters), state
    return float(math.prod(int(s) for s in shape)), state


def plan_ownership(shapes: dict[str, tuple], world_size: int, cfg, state_slack: float = 1.05,
                   allow_idle: bool = False) -> dict[str, int]:
    """Assign every parameter to one rank: LPT on refresh cost under a cap on optimizer-state bytes.

    Memory is the hard constraint (the rank with the most state sets the memory a run needs), so the
    state bytes of a rank may not exceed `state_slack` x the mean (or the largest single item, if that
    is bigger); among the ranks where the item fits, it goes to the one with the least refresh cost so
    far (then the least state, then the lowest rank). Items are taken largest first by the larger of
    their two shares (of total cost, of total state), then by name. Deterministic from the arguments
    alone (not from dict order), so every rank computes the same plan.
    """
    names = list(shapes)
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if world_size > len(names) and not allow_idle:
        raise ValueError(f"world size {world_size} exceeds the {len(names)} parameters to own; "
                         f"use at most {len(names)} data-parallel ranks for this model")
    costs = {n: param_cost(n, shapes[n], cfg) for n in names}
    total_c = sum(c for c, _ in costs.values()) or 1.0
    total_b = sum(b for _, b in costs.values()) or 1.0
    share = {n: (c / total_c, b / total_b) for n, (c, b) in costs.items()}
    cap = max(state_slack / world_size, max(b for _, b in share.values()))
    order = sorted(names, key=lambda n: (-max(share[n]), -sum(share[n]), n))
    load_c = [0.0] * world_size
    load_b = [0.0] * world_size
    plan: dict[str, int] = {}
    for n in order:
        c, b = share[n]
        fits = [r for r in range(world_size) if load_b[r] + b <= cap + 1e-12]
        if fits:
            best = min(fits, key=lambda r: (load_c[r] + c, load_b[r] + b, r))
        else:
            best = min(range(world_size), key=lambda r: (load_b[r] + b, load_c[r] + c, r))
        load_c[best] += c
        load_b[best] += b
        plan[n] = best
    return {n: plan[n] for n in sorted(names)}


def plan_summary(plan: dict[str, int], shapes: dict[str, tuple], cfg, world_size: int | None = None) -> dict:
    """Per-rank state bytes, refresh cost and parameter count, with max/mean imbalance of each."""
    world = world_size or (max(plan.values()) + 1)
    state = [0.0] * world
    cost = [0.0] * world
    count = [0] * world
    for n, r in plan.items():
        c, b = param_cost(n, shapes[n], cfg)
        state[r] += b
        cost[r] += c
        count[r] += 1
    imb = lambda xs: max(xs) / (sum(xs) / len(xs)) if sum(xs) else 1.0
    return {"world_size": world, "state_bytes": state, "cost": cost, "params": count,
            "state_imbalance": imb(state), "cost_imbalance": imb(cost)}


def layout_summary(layout: Layout, shapes: dict[str, tuple], cfg) -> dict:
    """Per-rank optimizer-state bytes, refresh cost and owned values under `layout`, with max/mean imbalances."""
    W = layout.world
    state, cost, numel = [0.0] * W, [0.0] * W, [0] * W
    for n in layout.order:
        c, b = param_cost(n, shapes[n], cfg)
        for r in range(W):
            f = layout.share(n, r)
            state[r] += b * f
            cost[r] += c * f
            numel[r] += round(layout.numel[n] * f)
    imb = lambda xs: max(xs) / (sum(xs) / len(xs)) if sum(xs) else 1.0      # noqa: E731
    return {"world_size": W, "state_bytes": state, "cost": cost, "numel": numel, "state_imbalance": imb(state),
            "cost_imbalance": imb(cost), "numel_imbalance": imb(numel)}


def describe_plan(plan: dict[str, int], shapes: dict[str, tuple], cfg, world_size: int | None = None,
                  print_fn=print) -> dict:
    """Print one line per rank (state MiB, share of refresh cost, #params) and the imbalance; return the summary."""
    s = plan_summary(plan, shapes, cfg, world_size)
    total_cost = sum(s["cost"]) or 1.0
    for r in range(s["world_size"]):
        print_fn(f"rank {r:3d}: state {s['state_bytes'][r] / 2**20:10.1f} MiB  "
                 f"refresh cost {100 * s['cost'][r] / total_cost:5.1f}%  params {s['params'][r]}")
    print_fn(f"max/mean imbalance: state {s['state_imbalance']:.3f}  refresh cost {s['cost_imbalance']:.3f}")
    return s


def run_signature(named, cfg, world_size: int, grad_mode: str) -> dict:
    """What every rank must agree on before the first collective: parameters (names, shapes, dtypes in order),
    the optimizer config, the world size and the gradient mode."""
    optim = dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(vars(cfg))
    return {"world_size": world_size, "grad_mode": grad_mode, "optim": optim,
            "params": [[n, list(p.shape), str(p.dtype).removeprefix("torch.")] for n, p in named]}


def describe_disagreement(sigs: list[dict]) -> str:
    """One line naming the first thing in which some rank's `run_signature` differs from rank 0's."""
    ref = sigs[0]
    for r, sig in enumerate(sigs[1:], start=1):
        if sig == ref:
            continue
        for key in ("world_size", "grad_mode"):
            if sig[key] != ref[key]:
                return f"ranks disagree: rank {r} has {key}={sig[key]}, rank 0 has {ref[key]}; launch every rank alike"
        for key in sorted(set(ref["optim"]) | set(sig["optim"])):
            if sig["optim"].get(key) != ref["optim"].get(key):
                return (f"ranks disagree: rank {r} has optim.{key}={sig['optim'].get(key)!r}, rank 0 has "
                        f"optim.{key}={ref['optim'].get(key)!r}; launch every rank with the same config")
        a, b = ref["params"], sig["params"]
        for i in range(max(len(a), len(b))):
            pa = a[i] if i < len(a) else None
            pb = b[i] if i < len(b) else None
            if pa != pb:
                return (f"ranks disagree on the model: parameter {i} is {pb} on rank {r} but {pa} on rank 0; "
                        f"launch every rank with the same --model.* settings and dtype")
    return "ranks disagree on the run signature; launch every rank with the same config"
