"""The sharded optimizer: ZeRO-style sharding that projected (GaLore/RGP) optimizers can live in.

Why not DeepSpeed's own stage 1/2. Stock ZeRO-1/2 flattens every parameter group into one buffer and
cuts it into W equal element ranges with no regard for parameter boundaries; the client optimizer is
handed one 1-D fp32 slice per group. A GaLore/RGP update needs the whole 2-D gradient of a matrix
(its SVD or randomized range finder), so a slice that ends half-way through `q_proj` is useless.
DeepSpeed's Muon support (`use_muon` in `stage_1_and_2.py`) works around the same problem by running
Newton-Schulz on the full accumulated gradient of every matrix touching a rank's range inside the
gradient path: matrices straddling two ranks are computed twice, their momentum lives in a side
buffer outside the partition layout (and outside its checkpoints), and doing 2-D math before the
overflow check and clipping caused a string of bugs (#8432, #8439, #8441). We want none of that.

The mechanism (docs/design.md §5). `optim/ownership.py` lays the parameters out, deterministically from names,
shapes, world size and optimizer config: a projected matrix is owned *whole* by one rank, and matrices of equal
size are grouped W at a time into rounds, one per rank; every other parameter (embeddings, lm_head, norms, and
all of a non-projected optimizer's) is *sliced* W ways as ZeRO slices it. Each rank builds the ordinary
single-process optimizer (`optim.build_optimizer`) over what it owns: its whole matrices and its flat slices
(views of the fp32 weights, or fp32 master slices of bf16 ones), so the owner alone keeps the moments, basis
and master copy, and alone computes a matrix's SVD/RSVD and update. Gradients travel by reduce-scatter of
buckets laid out rank-major, W equal chunks each (a rank's chunk: its slices of the bucket's sliced
parameters and its matrix of each round), so the bytes are ZeRO-2's; the updated weights come back by the
all-gather of the same layout. The few matrices in no round are reduced to and broadcast from their owner.
Because each parameter's update depends only on its own gradient and state (and RGP's random test matrix
only on its name and refresh step), N ranks compute exactly the update one process would with the same
averaged gradient: the result differs from a single process only by the floating-point order of the
gradient sum, and, for a sliced parameter, of its gradient norm (sum of its slices' squared norms) when
clipping. This is ZeRO-2 for the element-wise parameters and the design of DistMuon / Dion (whole-matrix
owners) for the projected ones.

Under DeepSpeed the engine runs at stage 0 with its own gradient all-reduce switched off
(`optim/deepspeed_glue.py`); this object is its client optimizer and does the communication.
Without DeepSpeed the trainer calls it directly; at world size 1 it is a pass-through.

Who does what. The files: the layout in `optim/ownership.py`; every collective in `optim/comm.py` (each one
counted by an optional `CommLedger`: `opt.ledger = CommLedger(world)`); this file the wrapper and its
checkpoints. torch.distributed moves the bytes (reduce-scatter / all-gather of flat buffers, reduce and
broadcast for the leftover matrices, all asynchronous with work handles, in the parameters' device);
DeepSpeed, when used, only runs forward/backward and calls step(). DDP's reducer and DeepSpeed's ZeRO
partitioner are not used: both cut buffers at element boundaries that ignore matrices, and a projected
matrix's owner needs the whole matrix. Gradients travel in `optim.comm_dtype` ("auto": the weights' dtype,
so bf16 for a bf16 model, as DDP does) and are averaged in fp32 on arrival.

Per optimizer step (build the wrapper after torch.distributed is initialised; always wrap, also at 1 rank):
    plain torchrun / one process:
        (loss / grad_accum).backward() for each micro-batch (all but the last inside opt.no_sync())
        opt.sync_gradients(); norm = opt.clip_grad_norm_(max_norm); opt.step(); opt.zero_grad()
    DeepSpeed (engine from optim.deepspeed_glue.init_deepspeed):
        engine.backward(loss) for each micro-batch      (the engine divides by gradient_accumulation_steps)
        opt.sync_gradients(); norm = opt.clip_grad_norm_(ds.grad_clip)   (else engine.step() does both)
        engine.step(); opt.zero_grad()                  (engine.step() -> opt.step(), once per call)
    LR: set group["lr"] on every entry of opt.param_groups.
Checkpoints: `save_optimizer_shards(opt, dir)` / `load_optimizer_shards(opt, dir)` on every rank;
the state is keyed by parameter name (and slice range), so a run resumes on a different number of ranks.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.distributed as dist

import checkpoint_files
import warnings

from optim import comm
from optim import projection as proj
from optim import validate_optim_config
from optim.adam import BLOCKSIZE, apply_lowrank_update, is_projected, set_basis
from optim.comm import CommLedger
from optim.ownership import SLICE_ALIGN, describe_disagreement, plan_layout, run_signature

FORMAT_VERSION = 2                 # 2: sliced parameters' state saved per slice, with its range
BUCKET_BYTES = 64 * 2**20          # weights and projected gradients travel in collectives of at most this size
GRAD_BUCKET_BYTES = 16 * 2**20     # gradient buckets sent during backward (smaller: less held, earlier overlap)
MAX_INFLIGHT = 1                   # gradient buckets in flight besides the newest (each holds a wire buffer)
CHUNK_BYTES = 2 * 2**20            # a table bigger than a bucket is reduce-scattered in chunks of this size


# --------------------------------------------------------------------------------------------------
# The wrapper

def _default_builder(named, cfg, shapes):
    import optim as _optim
    return _optim.build_optimizer(named, cfg, shapes)


def tensor_bytes(obj) -> int:
    """Bytes of every tensor in a (nested dict/list of) optimizer state."""
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def _buckets(items: list, size_of: Callable, limit: int = BUCKET_BYTES) -> Iterable[list]:
    bucket, used = [], 0
    for it in items:
        b = size_of(it)
        if bucket and used + b > limit:
            yield bucket
            bucket, used = [], 0
        bucket.append(it)
        used += b
    if bucket:
        yield bucket


@dataclass
class Bucket:
    """One collective's layout. kind "scatter": a reduce-scatter (gradients) / all-gather (weights) of W chunks of
    `width` values, rank j's chunk holding, at `offsets`, its slice of each ("slice", [name]) unit and its matrix
    of each ("round", names) unit. kind "owner": ("single", [name]) units of one owner, reduced / broadcast."""
    kind: str
    owner: int
    dtype: torch.dtype
    units: list
    offsets: list
    width: int
    names: list


def _into_rows(block: torch.Tensor, flat: torch.Tensor) -> None:
    """Lay `flat` (at most W x s values) out over the rows of the (W, s) view `block`, row j = rank j's slice."""
    s = block.shape[1]
    full, rest = divmod(flat.numel(), s)
    if full:
        block[:full].copy_(flat[:full * s].view(full, s))
    if rest:
        block[full, :rest].copy_(flat[full * s:])


def _from_rows(flat: torch.Tensor, block: torch.Tensor) -> None:
    """The inverse of _into_rows: `flat` (a tensor's values) from the rows of `block`."""
    s = block.shape[1]
    full, rest = divmod(flat.numel(), s)
    if full:
        flat[:full * s].view(full, s).copy_(block[:full])
    if rest:
        flat[full * s:].copy_(block[full, :rest])


class ShardedOptimizer:
    """Each parameter's optimizer state (basis, moments, master) lives with its owner(s) only (module doc).

    named_params: [(name, param)] in the same order on every rank (model order).
    build_inner(owned_named_tensors, cfg, shapes) -> torch.optim.Optimizer, called with this rank's share
    (whole parameters and flat slices; `shapes` gives a slice's whole shape).
    grad_mode: "allreduce" (ZeRO-1: gradients accumulate locally over micro-batches, are reduced once) or
    "reduce" (ZeRO-2: every micro-batch's gradients are reduced to their owners at once and freed). The
    names are the historical ones: both reduce to owners (an owner is the only rank that reads a gradient).
    Gradients that are None on every rank stay None (the parameter is skipped, as torch optimizers
    do); a gradient None on some ranks only counts as zeros there.
    """

    def __init__(self, named_params, cfg, build_inner: Callable | None = None, process_group=None,
                 grad_mode: str = "allreduce", collectives_at_world_size_1: bool = False):
        if grad_mode not in ("allreduce", "reduce"):
            raise ValueError(f"grad_mode must be 'allreduce' or 'reduce', got {grad_mode!r}")
        self.cfg = cfg
        self.grad_mode = grad_mode
        self.group = process_group
        self.named = [(n, p) for n, p in named_params if p.requires_grad]
        self._params = dict(self.named)
        if len(self._params) != len(self.named):
            raise ValueError("ShardedOptimizer: parameter names must be unique")
        initialised = dist.is_available() and dist.is_initialized()
        world = dist.get_world_size(process_group) if initialised else 1
        # collectives_at_world_size_1: run the whole communication path with one process (a single GPU cannot
        # host two NCCL ranks, so this is how one GPU exercises our NCCL collectives; bench/gpu_smoke.sh).
        self.distributed = initialised and (world > 1 or collectives_at_world_size_1)
        self.world_size = world if self.distributed else 1
        self.rank = dist.get_rank(process_group) if self.distributed else 0
        self.device = self._comm_device()
        # the gradients' wire dtype: optim.comm_dtype, "auto" = the parameters' (bf16 for a bf16 model, as DDP)
        self.comm_dtype = {"auto": next((p.dtype for _, p in self.named), torch.float32),
                           "float32": torch.float32, "bfloat16": torch.bfloat16}[getattr(cfg, "comm_dtype", "auto")]
        self._wire_bytes = torch.empty((), dtype=self.comm_dtype).element_size()
        self.ledger: CommLedger | None = None      # attach one to count this rank's bytes (bench/comm.py, tests)
        # Low-rank gradient communication (optim.lowrank_comm, the section "Low-rank communication" below)
        validate_optim_config(cfg)                 # also when this rank owns nothing (no inner optimizer to check)
        self.lowrank = bool(getattr(cfg, "lowrank_comm", False))
        self.projected = [n for n, p in self.named if self.lowrank and is_projected(n, p.shape)]
        self.sides = {n: proj.choose_side(tuple(p.shape), cfg.proj_type) for n, p in self.named if n in self.projected}
        self.bases: dict[str, torch.Tensor] = {}   # every projected matrix's basis, on every rank
        self.proj_steps = {n: 0 for n in self.projected}   # updates so far (the owner's state["step"]), every rank
        self._low: dict[str, torch.Tensor] = {}       # owner: this step's averaged projected gradient
        self._pending: dict[str, torch.Tensor] = {}   # this step's refreshed bases, installed by step()
        self._stepped: list[str] = []                 # projected matrices updated by this step
        self.track_grad_memory = False                # measure grad_bytes_peak (tests, bench): costs a loop per hook
        self.async_weights = False                    # step() only starts the weight all-gathers (broadcast_weights)
        self._weights_inflight: list = []
        self.grad_bytes_peak = 0
        self._no_sync = False
        shapes = {n: tuple(p.shape) for n, p in self.named}
        self.layout = plan_layout(shapes, self.world_size, cfg)
        self.plan = self.layout.plan()                # name -> owner; -1: sliced, every rank owns a slice
        # What this rank owns: whole parameters, and [a, b) flat slices of the sliced ones
        self.slices: dict[str, tuple[int, int]] = {}
        self.masters: dict[str, torch.Tensor] = {}    # fp32 masters (whole or slice) of low-precision weights
        self.owned: list[tuple[str, torch.Tensor]] = []   # (name, the tensor the inner optimizer updates)
        for n, p in self.named:
            if not self.layout.owns(n, self.rank):
                continue
            low_precision = p.dtype in (torch.bfloat16, torch.float16)
            if n in self.layout.slice_numel:
                a, b = self.slices[n] = self.layout.slice_range(n, self.rank)
                view = p.detach().view(-1)[a:b]       # fp32 weights: the optimizer updates them in place
                if low_precision:
                    self.masters[n] = view.float().clone().requires_grad_(True)
                self.owned.append((n, self.masters.get(n, view)))
            else:
                if low_precision:
                    self.masters[n] = p.detach().clone().float().requires_grad_(True)
                self.owned.append((n, self.masters.get(n, p)))
        self._inner_of = dict(self.owned)
        build_inner = build_inner or _default_builder
        self.inner = build_inner(self.owned, cfg, {n: shapes[n] for n in self.slices}) if self.owned else None
        if self.inner is not None and hasattr(self.inner, "whole_numel"):   # bnb's small-tensor rule: whole size
            self.inner.whole_numel = {self._inner_of[n]: self.layout.numel[n] for n in self.slices}
        self._empty_groups = [{"params": [], "names": [], "lr": cfg.lr}]
        self._inner_names = {id(t): n for n, t in self.owned}
        # under DeepSpeed, engine.step() calls step() only: sync + clip then happen inside it
        self.sync_in_step = False
        self.clip_in_step = 0.0
        self.last_grad_norm: torch.Tensor | None = None
        self._global_grad_norm = None
        self._synced = False
        self._clipped = False
        if self.distributed:
            self._check_ranks_agree()
        # optim.lowrank_update: owners send the low-rank update, every rank applies it to its own fp32 copy
        self.lowrank_update = self.lowrank and self.distributed and bool(getattr(cfg, "lowrank_update", False))
        self.replicas: dict[str, torch.Tensor] = {}
        if self.lowrank_update:
            for n in self.projected:
                p = self._params[n]
                self.replicas[n] = self.masters.get(n, p) if p.dtype == torch.float32 or n in self.masters \
                    else p.detach().float().clone()
            if self.inner is not None:
                self.inner.defer_updates = True
        if self.distributed:
            self._build_buckets()

    def _comm_device(self) -> torch.device:
        """The device of every collective buffer: the parameters' device. NCCL only takes CUDA tensors, and on a
        mixed `cpu:gloo,cuda:nccl` group the backend is picked by the tensor's device, so a flag created on the
        CPU by one rank and on the GPU by another would meet on different backends and hang."""
        devices = {p.device for _, p in self.named}
        if len(devices) > 1:
            raise ValueError(f"ShardedOptimizer: parameters live on several devices ({', '.join(sorted(map(str, devices)))}); "
                             f"move the whole model to one device before building the optimizer")
        device = devices.pop() if devices else torch.device("cpu")
        if self.distributed and device.type != "cuda" and "nccl" in str(dist.get_backend(self.group)).split(","):
            raise ValueError(f"the process group uses NCCL but the parameters are on {device}; move the model to "
                             f"its CUDA device (model.to(f'cuda:{{LOCAL_RANK}}')) before building the optimizer")
        return device

    def _check_ranks_agree(self) -> None:
        """Every rank computes the layout on its own; ranks launched with different models or optimizer
        settings would issue mismatched collectives (a hang or silent corruption). Compare a hash of what the
        layout and the collectives depend on, and stop every rank with one line naming the first difference."""
        sig = run_signature(self.named, self.cfg, self.world_size, self.grad_mode)
        digest = hashlib.sha256(json.dumps(sig, sort_keys=True, default=str).encode()).digest()
        mine = torch.tensor([int.from_bytes(digest[:8], "little", signed=True)], dtype=torch.int64, device=self.device)
        everyone = mine.repeat(self.world_size)          # a no-op collective (the fake process group) keeps them equal
        comm.all_gather_single(everyone, mine, self.group, self.ledger, "signature")
        if bool((everyone == mine).all()):
            return
        sigs: list = [None] * self.world_size
        dist.all_gather_object(sigs, sig, group=self.group)
        dist.barrier(group=self.group)      # every rank got every signature before any exits (gloo aborts a rank
        raise ValueError(describe_disagreement(sigs))   # whose peer closes the connection mid-collective)

    # -- what torch.optim.Optimizer users expect ---------------------------------------------------
    @property
    def param_groups(self) -> list[dict]:
        # A new list of the inner optimizer's group dicts: setting group["lr"] reaches the inner optimizer,
        # while list surgery by callers (DeepSpeed drops empty groups in place) cannot change its layout.
        return list(self.inner.param_groups) if self.inner is not None else list(self._empty_groups)

    @property
    def state(self):
        return self.inner.state if self.inner is not None else {}

    # -- gradients ---------------------------------------------------------------------------------
    @torch.no_grad()
    def sync_gradients(self) -> None:
        """Average gradients over ranks into their owners' fp32 tensors (see "Gradients during backward").
        Once per step: a second call before step()/zero_grad() does nothing."""
        if self._synced:
            return
        self.wait_for_weights()
        if not self.distributed:
            if dist.is_available() and dist.is_initialized() and dist.get_world_size(self.group) > 1:
                raise RuntimeError("this ShardedOptimizer was built before torch.distributed was initialised; "
                                   "build it after init_process_group so it shards across the ranks")
            self._live = [n for n, p in self.named if p.grad is not None]
            for n, master in self.masters.items():
                p = self._params[n]
                if p.grad is not None:
                    master.grad = p.grad.detach().float()
                    p.grad = None
            self._synced = True
            return
        self._finish_backward()
        if self.lowrank:
            live = set(self._live)
            self._sync_projected([(n, self._params[n]) for n in self.projected if n in live], self._wire_bytes)
        for n in self.projected:           # the full gradient of a projected matrix never travels: free it
            self._params[n].grad = None
        self._synced = True

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Global L2 norm of the averaged gradient (as torch.nn.utils.clip_grad_norm_ computes it: the norm of
        the per-tensor norms; a sliced tensor's norm is the root of its slices' summed squares); owned gradients
        are scaled by min(1, max_norm / (norm + 1e-6)). max_norm <= 0: norm only."""
        if not self._synced:
            self.sync_gradients()
        idx = {n: i for i, n in enumerate(self._live)}
        k = len(idx)
        vals = torch.zeros(2 * k, dtype=torch.float32, device=self.device)   # [whole norms | slices' squares]
        with_grad = [(n, t) for n, t in self.owned if t.grad is not None and n in idx]
        if with_grad:
            per = torch._foreach_norm([t.grad for _, t in with_grad], 2)
            for (n, _), v in zip(with_grad, per):
                if n in self.slices:
                    vals[k + idx[n]] = v.float() ** 2
                else:
                    vals[idx[n]] = v.float()
        lows = [n for n, _ in self.owned if n in self._low]      # low-rank comm: what the optimizer sees
        if lows:
            for n, v in zip(lows, torch._foreach_norm([self._low[n] for n in lows], 2)):
                vals[idx[n]] = v.float()
        if self.distributed:
            comm.all_reduce(vals, self.group, self.ledger, "norms")   # whole: one non-zero entry each, exact
        sliced = torch.tensor([n in self.layout.slice_numel for n in self._live], dtype=torch.bool,
                              device=self.device)
        norms = torch.where(sliced, vals[k:].sqrt(), vals[:k])
        total = torch.linalg.vector_norm(norms, 2)
        if max_norm > 0 and with_grad:
            torch.nn.utils.clip_grads_with_norm_([t for _, t in with_grad], max_norm, total)
        if max_norm > 0 and lows:                    # the same coefficient clip_grads_with_norm_ applies
            torch._foreach_mul_([self._low[n] for n in lows], torch.clamp(max_norm / (total + 1e-6), max=1.0))
        self.last_grad_norm = total
        self._global_grad_norm = total
        self._clipped = True
        return total

    # -- the step ----------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        if self.sync_in_step:                       # DeepSpeed: engine.step() may be all the trainer calls
            if not self._synced:
                self.sync_gradients()
            if not self._clipped:
                self.clip_grad_norm_(self.clip_in_step)
        stepped = list(self._stepped)
        if self.lowrank:
            self._install_projected()
        if self.inner is not None:
            self.inner.step()
        if self.lowrank_update:
            self._exchange_updates(stepped)
        for n, master in self.masters.items():
            self._weight_of(n).copy_(master)
            master.grad = None
        for n in self.slices:
            self._inner_of[n].grad = None
        self.broadcast_weights()
        self._synced = self._clipped = False

    def current_ranks(self) -> dict[str, int]:
        """{name: rank} of every projected matrix that has a basis (optim.rank_decay / rank_energy change them),
        from its owner, on every rank (a collective: call it on every rank)."""
        inner = getattr(self.inner, "current_ranks", None)
        mine = inner() if inner is not None else {}
        if not self.distributed:
            return mine
        names = sorted(self.layout.owner)
        ranks = torch.tensor([mine.get(n, 0) for n in names], dtype=torch.int64, device=self.device)
        comm.all_reduce(ranks, self.group, self.ledger, "ranks")     # one owner per entry: the others send 0
        return {n: int(r) for n, r in zip(names, ranks.tolist()) if r > 0}

    def _weight_of(self, n: str) -> torch.Tensor:
        """The part of parameter n's weights this rank owns: the parameter, or a flat view of its slice."""
        p = self._params[n]
        if n in self.slices:
            a, b = self.slices[n]
            return p.detach().view(-1)[a:b]
        return p

    @torch.no_grad()
    def broadcast_weights(self) -> None:
        """Owners send their updated weights to every rank in the parameters' dtype: an all-gather per bucket of
        slices and rounds (model order, at most BUCKET_BYTES), a broadcast per bucket of an owner's leftover
        matrices. Called by step(); nothing to do on one process. With `async_weights` (train.py sets it) they
        are only started: the caller overlaps them with loading the next batch and must call
        wait_for_weights() before anything reads the weights (the forward, an evaluation, a checkpoint); this
        wrapper's own entry points wait by themselves."""
        self.wait_for_weights()
        if not self.distributed:
            return
        for i, b in enumerate(self._weight_buckets):
            if b.kind == "scatter":
                seg = torch.zeros(b.width, dtype=b.dtype, device=self.device)
                for (kind, names), o in zip(b.units, b.offsets):
                    if kind == "slice":
                        x = self._weight_of(names[0]).reshape(-1)
                        seg[o:o + x.numel()].copy_(x)
                    else:
                        x = self._params[names[self.rank]].detach().reshape(-1)
                        seg[o:o + x.numel()].copy_(x)
                out = torch.empty(self.world_size * b.width, dtype=b.dtype, device=self.device)
                work = comm.all_gather_single(out, seg, self.group, self.ledger, "weights", async_op=True)
            else:
                ps = [self._params[n] for n in b.names]
                out = torch.cat([p.detach().reshape(-1) for p in ps]) if b.owner == self.rank else \
                    torch.empty(sum(p.numel() for p in ps), dtype=b.dtype, device=self.device)
                work = comm.broadcast(out, b.owner, self.group, self.ledger, "weights", async_op=True)
            self._weights_inflight.append((i, work, out, b))
        if not self.async_weights:
            self.wait_for_weights()

    @torch.no_grad()
    def wait_for_weights(self, upto: int | None = None) -> None:
        """Finish the weight collectives started by step() (async_weights): received values land in the params.
        upto: only the buckets up to this index (model order; the forward hooks of wait_in_forward)."""
        while self._weights_inflight and (upto is None or self._weights_inflight[0][0] <= upto):
            _, work, out, b = self._weights_inflight.pop(0)
            if work is not None:
                work.wait()
            if b.kind == "owner":
                if b.owner != self.rank:
                    off = 0
                    for n in b.names:
                        p = self._params[n]
                        p.copy_(out[off:off + p.numel()].view_as(p))
                        off += p.numel()
                continue
            rows = out.view(self.world_size, b.width)
            for (kind, names), o in zip(b.units, b.offsets):
                if kind == "slice":
                    p = self._params[names[0]]
                    _from_rows(p.detach().view(-1), rows[:, o:o + self.layout.slice_numel[names[0]]])
                else:
                    for j, n in enumerate(names):
                        if j != self.rank:
                            p = self._params[n]
                            p.copy_(rows[j, o:o + p.numel()].view_as(p))

    def wait_in_forward(self, model: torch.nn.Module) -> None:
        """Overlap the weight all-gathers (async_weights) with the next forward, as FSDP does: a forward pre-hook
        on every module that holds parameters waits only for the buckets holding them (buckets are in model
        order, so the first layers compute while the last ones' weights arrive). Everything else that reads
        weights must still call wait_for_weights() first (this wrapper's entry points do)."""
        if not self.distributed:
            return
        bucket_of = {n: i for i, b in enumerate(self._weight_buckets) for n in b.names}
        names = {id(p): n for n, p in self.named}
        me = weakref.ref(self)
        for module in model.modules():
            last = max((bucket_of.get(names.get(id(p)), -1) for p in module.parameters(recurse=False)), default=-1)
            if last >= 0:
                def hook(_module, _args, upto=last):
                    opt = me()
                    if opt is not None and opt._weights_inflight:
                        opt.wait_for_weights(upto)
                self._hook_handles.append(module.register_forward_pre_hook(hook))

    def zero_grad(self, set_to_none: bool = True) -> None:
        if self.distributed and not self._synced and (self._next_bucket or self._inflight):
            self._finish_backward()        # buckets already sent must be matched on every rank, then dropped
        if self.distributed:
            self._acc.clear()
            self._seen.clear()
        for _, p in self.named:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()
        for n, t in self.owned:
            if t is not self._params[n]:
                t.grad = None
        self._low.clear()
        self._pending.clear()
        self._stepped = []
        if self.inner is not None:
            self.inner.prepared.clear()
        self._synced = self._clipped = False

    def refresh_masters(self) -> None:
        """Re-copy fp32 masters from the (possibly just loaded) low-precision weights."""
        with torch.no_grad():
            for n, m in self.masters.items():
                m.copy_(self._weight_of(n).reshape(m.shape).float())

    # -- Gradients during backward ------------------------------------------------------------------
    # The layout's units (ownership.py: a sliced parameter, a round of W equal-size matrices, a leftover matrix)
    # are packed, in reverse model order (the order backward produces their gradients; a round when its last
    # matrix arrives), into buckets of at most GRAD_BUCKET_BYTES: "scatter" buckets of slices and rounds, one
    # reduce-scatter each, and "owner" buckets of one owner's leftover matrices, one reduce each. A
    # post-accumulate-grad hook counts a parameter in; when a bucket is complete its reduction starts at once,
    # asynchronously, so communication overlaps the rest of backward. Buckets start strictly in their fixed
    # order, so every rank issues the same collectives in the same order (NCCL requires it). As with DDP
    # without find_unused_parameters, every rank must produce the same parameters' gradients in a micro-batch
    # (a LLaMA uses all of its parameters); a parameter without a gradient anywhere is sent as zeros once at
    # sync_gradients and then treated as absent (its grad stays None, the optimizer skips it). The local
    # gradient is copied into the bucket's wire buffer and freed at once, and each rank adds the chunk it
    # receives into fp32 accumulators of what it owns: with "reduce" (ZeRO-2) every micro-batch is reduced this
    # way, so no rank ever holds the full gradient (a round's matrices wait, at most, for W equal-size matrices
    # of backward). Inside `no_sync()` (the trainer wraps every micro-batch but the last) "allreduce" (ZeRO-1)
    # accumulates locally and reduces once, like DDP. sync_gradients() waits. With optim.lowrank_comm the
    # projected matrices are not in these buckets (see "Low-rank communication").

    def _units(self, skip: set) -> list[tuple[str, list[str]]]:
        layout, units = self.layout, []
        left = [len(r) for r in layout.rounds]
        for n in reversed(layout.order):
            if n in skip:
                continue
            if n in layout.slice_numel:
                units.append(("slice", [n]))
            elif n in layout.round_of:
                k = layout.round_of[n]
                left[k] -= 1
                if left[k] == 0:
                    units.append(("round", layout.rounds[k]))
            else:
                units.append(("single", [n]))
        return units

    def _pack(self, units: list, limit: int, elem_bytes: Callable) -> list[Bucket]:
        """Consecutive units into buckets (module docstring), by kind, owner and dtype, of at most `limit` bytes."""
        W, layout = self.world_size, self.layout
        buckets: list[Bucket] = []
        used = 0
        for kind, names in units:
            dtype = self._params[names[0]].dtype
            if kind == "single":
                key, width = ("owner", layout.owner[names[0]], dtype), layout.numel[names[0]]
                size = width * elem_bytes(dtype)
            else:
                width = layout.slice_numel[names[0]] if kind == "slice" else layout.numel[names[0]]
                key, size = ("scatter", -1, dtype), W * width * elem_bytes(dtype)
            last = buckets[-1] if buckets else None
            if last is None or (last.kind, last.owner, last.dtype) != key or used + size > limit:
                last = Bucket(key[0], key[1], dtype, [], [], 0, [])
                buckets.append(last)
                used = 0
            last.units.append((kind, names))
            last.offsets.append(last.width)
            last.width += width
            last.names += names
            used += size
        return buckets

    def _build_buckets(self) -> None:
        self._grad_buckets = self._pack(self._units(set(self.projected)), GRAD_BUCKET_BYTES,
                                        lambda dt: self._wire_bytes)
        weights = self._pack(self._units(set(self.replicas)), BUCKET_BYTES,
                             lambda dt: torch.empty((), dtype=dt).element_size())
        self._weight_buckets = weights[::-1]       # model order: the next forward needs the first layers first
        self._bucket_of = {n: i for i, b in enumerate(self._grad_buckets) for n in b.names}
        self._arrived = [0] * len(self._grad_buckets)
        self._counted: set[str] = set()            # counted into its bucket during this micro-batch
        self._next_bucket = 0
        self._inflight: list = []                  # (bucket index, work, received chunk, wire buffer)
        self._acc: dict[str, torch.Tensor] = {}    # fp32 sums of this rank's received gradients (flat)
        self._seen: set[str] = set()               # had a gradient on this rank during this step
        # The hooks hold the wrapper weakly: a discarded wrapper (and its fp32 masters) is freed, its hooks
        # become no-ops; remove_hooks() takes them off explicitly.
        me = weakref.ref(self)

        def hook(name, p):
            opt = me()
            if opt is not None:
                opt._on_grad(name, p)
        self._hook_handles = [p.register_post_accumulate_grad_hook(functools.partial(hook, n)) for n, p in self.named]

    def remove_hooks(self) -> None:
        """Take this wrapper's gradient hooks off the parameters (e.g. before building another over them)."""
        for h in getattr(self, "_hook_handles", []):
            h.remove()
        self._hook_handles = []

    @contextlib.contextmanager
    def no_sync(self):
        """Backward passes inside accumulate locally ("allreduce") or are still reduced ("reduce")."""
        self._no_sync = True
        try:
            yield
        finally:
            self._no_sync = False

    def _on_grad(self, name: str, p: torch.Tensor) -> None:
        if not self.distributed:
            return
        self._seen.add(name)
        if name in self._bucket_of and not (self._no_sync and self.grad_mode == "allreduce") \
                and name not in self._counted:
            self._counted.add(name)
            i = self._bucket_of[name]
            self._arrived[i] += 1
            while self._next_bucket < len(self._grad_buckets) and \
                    self._arrived[self._next_bucket] == len(self._grad_buckets[self._next_bucket].names):
                self._launch(self._next_bucket)
        if self.track_grad_memory:
            self._note_grad_memory()

    def _launch(self, i: int) -> None:
        b = self._grad_buckets[i]
        if self._unpadded_single_slice(b) and self.world_size * b.width * self._wire_bytes > GRAD_BUCKET_BYTES:
            self._scatter_in_chunks(b)
        else:
            flat, buf = self._wire_buffers(b)
            for n in b.names:
                if self._params[n].grad is not None:
                    self._seen.add(n)
                self._params[n].grad = None        # its values are in the wire buffer now
            if buf is None:
                work = comm.reduce(flat, b.owner, self.group, self.ledger, "grads", async_op=True)
            else:
                work = comm.reduce_scatter_single(flat, buf.view(-1), self.group, self.ledger, "grads",
                                                  async_op=True)
            self._inflight.append((i, work, flat, buf))
        while len(self._inflight) > MAX_INFLIGHT:  # bound the wire buffers alive at once
            self._wait_oldest()
        self._next_bucket += 1
        if self._next_bucket == len(self._grad_buckets):     # every bucket of this micro-batch is out
            self._next_bucket = 0
            self._arrived = [0] * len(self._grad_buckets)
            self._counted.clear()
            if self.track_grad_memory:
                self._note_grad_memory()
            self._wait_all()                       # before the next micro-batch reuses the buckets

    def _wire_buffers(self, b: Bucket) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(what this rank sends and receives in, the reduce-scatter input or None for an owner's reduce)."""
        def grad(n):
            g = self._params[n].grad
            return (g if g is not None else torch.zeros_like(self._params[n])).reshape(-1).to(self.comm_dtype)
        if b.kind == "owner":
            # One parameter: its gradient's own storage is the wire buffer (no copy)
            return (torch.cat([grad(n) for n in b.names]) if len(b.names) > 1 else grad(b.names[0])), None
        flat = torch.empty(b.width, dtype=self.comm_dtype, device=self.device)
        if self._unpadded_single_slice(b):       # a parameter the W slices cover exactly: its storage, no copy
            return flat, grad(b.names[0]).view(self.world_size, b.width)
        buf = torch.zeros(self.world_size, b.width, dtype=self.comm_dtype, device=self.device)
        for (kind, names), o in zip(b.units, b.offsets):
            if kind == "slice":
                g = self._params[names[0]].grad
                if g is not None:
                    _into_rows(buf[:, o:o + self.layout.slice_numel[names[0]]], g.reshape(-1))
            else:
                for j, n in enumerate(names):
                    g = self._params[n].grad
                    if g is not None:
                        buf[j, o:o + g.numel()].copy_(g.reshape(-1))
        return flat, buf

    def _scatter_in_chunks(self, b: Bucket) -> None:
        """A table bigger than a bucket (embed_tokens, lm_head): reduce-scatter it in column chunks of at most
        CHUNK_BYTES, each added into the accumulator before the next starts, so that besides the table's own
        gradient (which autograd produced whole) only one small chunk is in transit; the tables come first
        and last in backward, where there is little left to overlap with."""
        n = b.names[0]
        p = self._params[n]
        self._wait_all()                           # (in order: earlier buckets first)
        W, s = self.world_size, b.width
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        g = g.reshape(-1).to(self.comm_dtype).view(W, s)
        if p.grad is not None:
            self._seen.add(n)
        acc = self._acc.get(n)
        fresh = acc is None
        if fresh:
            acc = self._acc[n] = torch.empty(s, dtype=torch.float32, device=self.device)
        step = max(SLICE_ALIGN, CHUNK_BYTES // (W * self._wire_bytes))
        for c0 in range(0, s, step):
            wire = g[:, c0:c0 + step].contiguous()
            out = torch.empty(wire.shape[1], dtype=self.comm_dtype, device=self.device)
            comm.reduce_scatter_single(out, wire.view(-1), self.group, self.ledger, "grads")
            if self.track_grad_memory:
                self._note_grad_memory(extra=(wire.numel() + out.numel()) * self._wire_bytes)
            avg = out.float().div_(W)              # averaged in fp32 whatever the wire dtype
            if fresh:
                acc[c0:c0 + step].copy_(avg)
            else:
                acc[c0:c0 + step].add_(avg)
        p.grad = None

    def _unpadded_single_slice(self, b: Bucket) -> bool:
        return len(b.units) == 1 and b.units[0][0] == "slice" and \
            self.world_size * b.width == self.layout.numel[b.names[0]]

    def _wait_all(self) -> None:
        while self._inflight:
            self._wait_oldest()

    def _accumulate(self, n: str, g: torch.Tensor) -> None:
        if n in self._acc:
            self._acc[n].add_(g)
        else:
            self._acc[n] = g                       # a view: the received buffer becomes the accumulator, no copy

    def _wait_oldest(self) -> None:
        i, work, flat, _ = self._inflight.pop(0)
        work.wait()
        b = self._grad_buckets[i]
        if b.kind == "owner" and b.owner != self.rank:
            return                                 # not ours: dropped
        flat = flat.float().div_(self.world_size)  # averaged in fp32 whatever the wire dtype
        if b.kind == "owner":
            off = 0
            for n in b.names:
                k = self.layout.numel[n]
                self._accumulate(n, flat[off:off + k])
                off += k
            return
        for (kind, names), o in zip(b.units, b.offsets):
            if kind == "slice":
                a, e = self.layout.slice_range(names[0], self.rank)
                if e > a:
                    self._accumulate(names[0], flat[o:o + e - a])
            else:
                n = names[self.rank]
                self._accumulate(n, flat[o:o + self.layout.numel[n]])

    def _finish_backward(self) -> None:
        """Start every bucket not started yet (in order), wait, and hand the averaged gradients over."""
        # A round in progress, or gradients not yet counted into a complete bucket: finish the round. Whether
        # that is so is the same on every rank when every rank uses the same parameters (module docstring).
        if self._next_bucket or self._counted or self._pending_local():
            for j in range(self._next_bucket, len(self._grad_buckets)):
                self._launch(j)
        self._wait_all()
        present = torch.tensor([n in self._seen or self._params[n].grad is not None for n, _ in self.named],
                               dtype=torch.int32, device=self.device)
        comm.all_reduce(present, self.group, self.ledger, "flags", op=dist.ReduceOp.MAX)
        self._live = [n for (n, _), f in zip(self.named, present.tolist()) if f]
        live = set(self._live)
        for n, t in self.owned:
            if n not in self._bucket_of:
                continue                           # a projected matrix under lowrank_comm: _sync_projected's
            acc = self._acc.pop(n, None)
            p = self._params[n]
            if acc is None or n not in live:
                t.grad = None
            elif n in self.slices:
                t.grad = acc
            elif n in self.masters:
                t.grad = acc.view_as(p)
            else:
                p.grad = acc.view_as(p).to(p.dtype)      # (no copy for fp32 weights)
        self._acc.clear()
        self._seen.clear()

    def _pending_local(self) -> bool:
        return any(self._params[n].grad is not None for n in self._bucket_of)

    def _note_grad_memory(self, extra: int = 0) -> None:
        held = extra + sum(p.grad.numel() * p.grad.element_size() for p in self._params.values() if p.grad is not None)
        held += sum(t.numel() * t.element_size() for t in self._acc.values())
        held += sum(f.numel() * f.element_size() + (b.numel() * b.element_size() if b is not None else 0)
                    for _, _, f, b in self._inflight)
        self.grad_bytes_peak = max(self.grad_bytes_peak, held)

    # -- Low-rank communication ---------------------------------------------------------------------
    # optim.lowrank_comm: a projected matrix's update needs only its projected gradient, and projection is
    # linear, so reduce(G_i) @ Q == reduce(G_i @ Q). Every rank keeps the bases of all projected matrices and
    # reduces only G_i @ Q (or P^T G_i) to the owner: r / min(m, n) of the bytes. At a refresh, RGP's range
    # finder is linear in G too (its test matrix is seeded by name and step, the same on every rank): reduce
    # Y = sum G_i Omega to the owner, which orthonormalises it and broadcasts Q; reduce B = sum Q^T G_i; the
    # owner finishes the SVD (projection.basis_from_sketch) and, since the new basis P lies in span(Q), already
    # holds the projected gradient P^T G = (Q^T P)^T B. GaLore's exact SVD needs the full gradient: it is
    # reduced at refresh steps only. The owner then broadcasts the new basis. Gradient clipping in this mode
    # uses the norm of what the optimizer sees: projected gradients plus the full non-projected ones.

    def _basis_shape(self, n: str) -> tuple[int, int]:
        """(n, r) for side "right", (m, r) for "left" (optim/projection.py)."""
        m, cols = self._params[n].shape
        return (cols if self.sides[n] == "right" else m, self.cfg.rank)

    def _low_shape(self, n: str) -> tuple[int, int]:
        """The projected gradient's (and the low-rank update's) shape: (m, r) for "right", (r, n) for "left"."""
        m, cols = self._params[n].shape
        return (m, self.cfg.rank) if self.sides[n] == "right" else (self.cfg.rank, cols)

    def _local_grad(self, p: torch.Tensor) -> torch.Tensor:
        return p.grad.float() if p.grad is not None else torch.zeros(p.shape, dtype=torch.float32, device=p.device)

    def _sync_projected(self, items: list, wire: int) -> None:
        T, W = self.cfg.update_proj_gap, self.world_size
        steady = [(n, p) for n, p in items if n in self.bases and self.proj_steps[n] % T != 0]
        for owner in range(W):
            mine = [(n, p) for n, p in steady if self.plan[n] == owner]
            for bucket in _buckets(mine, lambda np_: math.prod(self._low_shape(np_[0])) * wire):
                lows = [proj.project(self._local_grad(p), self.bases[n], self.sides[n]) for n, p in bucket]
                flat = torch.cat([x.reshape(-1) for x in lows]).to(self.comm_dtype)
                comm.reduce(flat, owner, self.group, self.ledger, "grads")
                if owner == self.rank:
                    flat = flat.float().div_(W)
                    off = 0
                    for (n, _), x in zip(bucket, lows):
                        self._low[n] = flat[off:off + x.numel()].view_as(x).clone()
                        off += x.numel()
        done = {n for n, _ in steady}
        for n, p in items:
            if n not in done:
                self._refresh_projected(n, p)
        self._stepped = [n for n, _ in items]
        for _, p in items:                 # the full gradient of a projected matrix never travels: free it
            p.grad = None

    def _reduce_to(self, t: torch.Tensor, owner: int, tag: str) -> torch.Tensor:
        """Sum `t` over ranks onto `owner` (in the wire dtype), averaged in fp32 there."""
        buf = t.to(self.comm_dtype).contiguous()
        comm.reduce(buf, owner, self.group, self.ledger, tag)
        return buf.float().div_(self.world_size)

    def _from(self, t: torch.Tensor | None, shape, owner: int, tag: str) -> torch.Tensor:
        """The owner's fp32 tensor `t` on every rank."""
        buf = t.contiguous() if owner == self.rank else torch.empty(shape, dtype=torch.float32, device=self.device)
        comm.broadcast(buf, owner, self.group, self.ledger, tag)
        return buf

    def _refresh_projected(self, n: str, p: torch.Tensor) -> None:
        cfg, side, owner = self.cfg, self.sides[n], self.plan[n]
        mine = owner == self.rank
        g = self._local_grad(p)
        rank = cfg.rank
        if cfg.name.startswith("galore"):          # exact SVD: the full gradient, at refresh steps only
            full = self._reduce_to(g, owner, "refresh")
            new = proj.exact_basis(full, rank, side) if mine else None
            low = proj.project(full, new, side) if mine else None
        else:                                      # RGP: the randomized range finder from summed sketches
            a = g if side == "left" else g.t()                       # the basis spans a's columns
            M, N = a.shape
            k = min(rank + max(cfg.oversampling, 0), min(M, N))
            omega = proj.sketch_matrix(N, k, n, self.proj_steps[n]).to(a.device)
            y = self._reduce_to(a @ omega, owner, "refresh")
            q = proj._orthonormal(y) if mine else None
            for _ in range(cfg.power_iters):
                q = self._from(q, (M, k), owner, "refresh")
                z = self._reduce_to(a.t() @ q, owner, "refresh")
                z = self._from(proj._orthonormal(z) if mine else None, (N, k), owner, "refresh")
                y = self._reduce_to(a @ z, owner, "refresh")
                q = proj._orthonormal(y) if mine else None
            q = self._from(q, (M, k), owner, "refresh")
            b = self._reduce_to(q.t() @ a, owner, "refresh")
            new = proj.basis_from_sketch(q, b, rank) if mine else None
            if mine:
                low = (q.t() @ new).t() @ b                          # P^T a: P lies in span(q)
                low = low if side == "left" else low.t()
        if mine:
            if not bool(torch.isfinite(new).all()):  # keep the old basis (as the optimizer does); the non-finite
                warnings.warn(f"non-finite gradient for {n}: projection refresh skipped")   # norm stops the step
                new = self.bases.get(n, new)
            self._low[n] = low
        self._pending[n] = self._from(new, self._basis_shape(n), owner, "bases")

    def _install_projected(self) -> None:
        """step(): the refreshed bases take effect (owners: in the optimizer state, moments re-expressed if
        asked), owners hand their projected gradients to the optimizer, every rank counts the update."""
        for n, basis in self._pending.items():
            if self.plan[n] == self.rank:
                holder = self._inner_of[n]
                set_basis(self.inner.state[holder], basis, self.sides[n], self.cfg.moments_on_refresh)
            self.bases[n] = basis
        for n, low in self._low.items():
            self.inner.prepared[self._inner_of[n]] = low
        for n in self._stepped:
            self.proj_steps[n] += 1
        self._low.clear()
        self._pending.clear()
        self._stepped = []

    @torch.no_grad()
    def _exchange_updates(self, stepped: list[str]) -> None:
        """optim.lowrank_update: each owner broadcasts, per projected matrix it stepped, the low-rank direction
        (r x n or m x r, in optim.comm_dtype: fp32 for an fp32 model, bf16 for a bf16 one) and its step size
        and lr (fp64: the exact Python floats); every rank, the owner included, applies the values as sent with
        the same function to its fp32 copy, so the copies stay bit-identical (tests/distributed check it) while
        the matrix itself never travels."""
        wire = self._wire_bytes
        for owner in range(self.world_size):
            mine = [n for n in stepped if self.plan[n] == owner]
            shapes = {n: self._low_shape(n) for n in mine}
            for bucket in _buckets(mine, lambda n: math.prod(shapes[n]) * wire):
                if owner == self.rank:
                    got = [self.inner.updates.pop(self._inner_of[n], None)
                           if self.inner is not None else None for n in bucket]
                    got = [g if g is not None else (torch.zeros(shapes[n], device=self.device), 0.0, 0.0)
                           for n, g in zip(bucket, got)]      # (no update computed: e.g. bench/comm.py)
                    flat = torch.cat([d.reshape(-1) for d, _, _ in got]).to(self.comm_dtype)
                    scalars = torch.tensor([x for _, ss, lr in got for x in (ss, lr)], dtype=torch.float64,
                                           device=self.device)
                else:
                    flat = torch.empty(sum(shapes[n][0] * shapes[n][1] for n in bucket), dtype=self.comm_dtype,
                                       device=self.device)
                    scalars = torch.empty(2 * len(bucket), dtype=torch.float64, device=self.device)
                comm.broadcast(flat, owner, self.group, self.ledger, "updates")
                comm.broadcast(scalars, owner, self.group, self.ledger, "updates")
                values = scalars.tolist()
                off = 0
                for i, n in enumerate(bucket):
                    k = shapes[n][0] * shapes[n][1]
                    direction = flat[off:off + k].view(shapes[n]).float()   # the owner too: the value sent
                    off += k
                    replica = self.replicas[n]
                    apply_lowrank_update(replica, direction, self.bases[n], self.sides[n], step_size=values[2 * i],
                                         scale=self.cfg.scale, lr=values[2 * i + 1],
                                         weight_decay=self.cfg.weight_decay)
                    if replica is not self._params[n] and n not in self.masters:   # (owners' masters: step copies)
                        self._params[n].copy_(replica)

    def _share_projected_state(self) -> None:
        """After loading a checkpoint: every rank gets every projected matrix's basis and update count from
        its owner (non-owners' copies are not saved; they are rebuilt here, bit for bit)."""
        steps = torch.zeros(len(self.projected), dtype=torch.int64, device=self.device)
        for i, n in enumerate(self.projected):
            if self.plan[n] == self.rank:
                st = self.inner.state.get(self._inner_of[n], {})
                if st.get("basis") is not None:
                    steps[i] = int(st.get("step", 0)) + 1
        comm.all_reduce(steps, self.group, self.ledger, "resume")
        self.bases.clear()
        for i, n in enumerate(self.projected):
            count = int(steps[i])
            self.proj_steps[n] = max(count - 1, 0)
            if count:
                mine = self.plan[n] == self.rank
                basis = self.inner.state[self._inner_of[n]]["basis"] if mine else None
                got = self._from(basis, self._basis_shape(n), self.plan[n], "resume")
                self.bases[n] = basis if mine else got
        for n in self.projected:                   # lowrank_update, bf16: non-owners' fp32 copies = the masters
            p = self._params[n]
            if self.lowrank_update and n in self.replicas and self.replicas[n] is not p:
                got = self._from(self.masters[n].detach() if self.plan[n] == self.rank else None, tuple(p.shape),
                                 self.plan[n], "resume")
                if self.plan[n] != self.rank:
                    self.replicas[n].copy_(got)

    # -- state -------------------------------------------------------------------------------------
    def _index_names(self) -> list[str]:
        """Names in the order torch.optim.Optimizer.state_dict numbers parameters."""
        if self.inner is None:
            return []
        return [self._inner_names[id(p)] for g in self.inner.param_groups for p in g["params"]]

    def state_dict(self) -> dict:
        """This rank's owned state keyed by parameter name, plus the plan and world size; "slices" gives the flat
        [start, end) and whole size of each sliced parameter's piece (its state and master are that range)."""
        self.wait_for_weights()
        out = {"format": FORMAT_VERSION, "world_size": self.world_size, "rank": self.rank,
               "optimizer": self.cfg.name, "plan": dict(self.plan), "state": {}, "masters": {},
               "slices": {n: [a, b, self.layout.numel[n]] for n, (a, b) in self.slices.items()},
               "param_groups": []}
        if self.inner is None:
            return out
        sd = self.inner.state_dict()
        names = self._index_names()
        for idx, st in sd["state"].items():
            out["state"][names[idx]] = st
        for g in sd["param_groups"]:
            g = dict(g)
            g["params"] = [names[i] for i in g["params"]]
            out["param_groups"].append(g)
        out["masters"] = {n: m.detach().clone() for n, m in self.masters.items()}
        return out

    def load_state_dict(self, sd: dict) -> None:
        """Load states by name for what this rank owns. `sd` is one rank's state_dict() (from any world size),
        or the merge `load_optimizer_shards` builds: {"plan", "pieces": {name: [(start, end, state)]},
        "master_pieces": {name: [(start, end, tensor)]}}; a sliced parameter's state is cut from (or joined
        out of) the pieces that cover this rank's slice."""
        self.wait_for_weights()
        unknown = set(sd.get("plan", {})) ^ {n for n, _ in self.named}
        if sd.get("plan") and unknown:
            raise ValueError(f"optimizer checkpoint does not match the model: parameter names differ, "
                             f"e.g. {sorted(unknown)[0]!r}")
        pieces, master_pieces = sd.get("pieces"), sd.get("master_pieces")
        if pieces is None:
            ranges = {n: tuple(r[:2]) for n, r in sd.get("slices", {}).items()}
            whole = lambda n: (0, self.layout.numel[n])                          # noqa: E731
            pieces = {n: [(*ranges.get(n, whole(n)), st)] for n, st in sd.get("state", {}).items()}
            master_pieces = {n: [(*ranges.get(n, whole(n)), m)] for n, m in sd.get("masters", {}).items()}
        self.refresh_masters()
        for n, m in self.masters.items():
            if master_pieces.get(n):
                m.data.copy_(_cut(master_pieces[n], *self._range(n), m.shape))
        # (a parameter saved in one piece that is exactly what this rank owns is loaded as it is: projected
        # matrices always are, and their state - basis, low-rank moments - is not per element)
        if self.inner is None:
            return
        names = self._index_names()
        cur = self.inner.state_dict()
        state = {}
        for i, n in enumerate(names):
            if len(pieces.get(n, [])) == 1 and tuple(pieces[n][0][:2]) == self._range(n):
                state[i] = pieces[n][0][2]
            elif pieces.get(n):
                t = self._inner_of[n]
                state[i] = {k: (_cut([(a, b, st[k]) for a, b, st in pieces[n]], *self._range(n), t.shape)
                                if torch.is_tensor(v) and v.dim() > 0 else v) for k, v in pieces[n][0][2].items()}
        self.inner.load_state_dict({"state": state, "param_groups": cur["param_groups"]})

    def _range(self, n: str) -> tuple[int, int]:
        return self.slices.get(n, (0, self.layout.numel[n]))

    def state_bytes(self) -> int:
        """Bytes of this rank's optimizer state tensors plus its fp32 master copies."""
        inner = tensor_bytes(list(self.inner.state.values())) if self.inner is not None else 0
        return inner + sum(tensor_bytes(m) for m in self.masters.values())

    def __repr__(self):
        return (f"ShardedOptimizer(rank {self.rank}/{self.world_size}, {self.grad_mode}, "
                f"owns {len(self.owned)}/{len(self.named)} params ({len(self.slices)} as slices), "
                f"inner={type(self.inner).__name__})")


def _cut(pieces: list, start: int, end: int, shape) -> torch.Tensor:
    """Values [start, end) of a flat tensor given as (a, b, tensor) pieces that cover it, shaped `shape`.

    A piece's tensor holds either one value per element (moments, 8-bit codes, masters) or one per BLOCKSIZE
    block (8-bit absmax); slices start on block boundaries (ownership.SLICE_ALIGN), so blocks never straddle
    pieces. Exact: values are only copied."""
    pieces = sorted(pieces, key=lambda x: x[0])
    a0 = pieces[0][0] if pieces else start
    if not pieces or a0 > start or pieces[-1][1] < end or any(p[1] != q[0] for p, q in zip(pieces, pieces[1:])):
        raise ValueError(f"optimizer checkpoint pieces {[(a, b) for a, b, _ in pieces]} do not cover "
                         f"[{start}, {end}); the checkpoint is incomplete")
    per_element = all(t.numel() == b - a for a, b, t in pieces)
    flat = torch.cat([t.reshape(-1) for _, _, t in pieces])
    if per_element:
        return flat[start - a0:end - a0].clone().view(shape)
    lo = (start - a0) // BLOCKSIZE
    return flat[lo:lo + math.ceil((end - start) / BLOCKSIZE)].clone()


# --------------------------------------------------------------------------------------------------
# Sharded checkpoints

class ShardFileError(FileNotFoundError):
    """An optimizer shard file that is missing or unreadable (the message names the file)."""


def save_optimizer_shards(opt: ShardedOptimizer, ckpt_dir) -> None:
    """Every rank writes optim_rank{r:05d}.pt (its owned state); rank 0 writes optim_manifest.json.

    Each file is written to a .tmp name, fsynced and renamed into place, then the directory is fsynced, so what
    a later rename of the directory publishes is on the disk. A failed write raises an OSError naming the file,
    after the closing barrier: the other ranks are not left waiting in it.
    """
    ckpt_dir = Path(ckpt_dir)
    try:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        path = ckpt_dir / checkpoint_files.optim_file(opt.rank)
        tmp = path.with_name(path.name + ".tmp")
        checkpoint_files.write_torch(tmp, opt.state_dict())
        os.replace(tmp, path)
        if opt.rank == 0:
            manifest = {"format": FORMAT_VERSION, "world_size": opt.world_size, "optimizer": opt.cfg.name,
                        "files": [checkpoint_files.optim_file(r) for r in range(opt.world_size)], "plan": opt.plan,
                        "slice_numel": opt.layout.slice_numel}
            path = ckpt_dir / checkpoint_files.OPTIM_MANIFEST
            tmp = path.with_name(path.name + ".tmp")
            checkpoint_files.write_text(tmp, json.dumps(manifest, indent=1))
            os.replace(tmp, path)
        checkpoint_files.fsync(ckpt_dir)
    finally:
        if opt.distributed:
            dist.barrier(group=opt.group)


def load_optimizer_shards(opt: ShardedOptimizer, ckpt_dir) -> None:
    """Load the states of what this rank owns now, from whichever rank files hold them (any world size).

    Every rank checks every file named by the manifest first, so a missing file fails all ranks alike
    (no collective is involved, nothing hangs). Also refreshes fp32 masters from the weights.
    """
    ckpt_dir = Path(ckpt_dir)
    mpath = ckpt_dir / checkpoint_files.OPTIM_MANIFEST
    if not mpath.is_file():
        raise FileNotFoundError(f"optimizer checkpoint manifest {mpath} is missing; the checkpoint is incomplete")
    manifest = json.loads(mpath.read_text())
    for f in manifest["files"]:
        if not (ckpt_dir / f).is_file():
            raise FileNotFoundError(f"optimizer shard {ckpt_dir / f} is missing "
                                    f"(checkpoint written by {manifest['world_size']} ranks)")
    plan = manifest["plan"]
    here = {n for n, _ in opt.named}
    if set(plan) != here:
        diff = sorted(set(plan) ^ here)
        raise ValueError(f"optimizer checkpoint {ckpt_dir} does not match the model: parameter {diff[0]!r} "
                         f"is in {'the checkpoint' if diff[0] in plan else 'the model'} only")
    if manifest.get("optimizer", opt.cfg.name) != opt.cfg.name:
        raise ValueError(f"optimizer checkpoint {ckpt_dir} was written by {manifest['optimizer']!r}, "
                         f"this run uses {opt.cfg.name!r}")
    saved_slices = manifest.get("slice_numel", {})
    wanted: dict[int, set] = {}                  # file index -> the names this rank needs from it
    for n, _ in opt.owned:
        if plan[n] >= 0:
            wanted.setdefault(plan[n], set()).add(n)
        else:                                    # the saved slices that overlap this rank's range
            start, end = opt._range(n)
            s = saved_slices[n]
            for j in range(start // s, (end - 1) // s + 1):
                wanted.setdefault(j, set()).add(n)
    merged = {"plan": plan, "pieces": {}, "master_pieces": {}}
    for j in sorted(wanted):
        f = manifest["files"][j]
        try:
            sd = torch.load(ckpt_dir / f, map_location="cpu", weights_only=True)
        except Exception as e:   # torch raises several classes for a truncated or foreign file
            raise ShardFileError(f"optimizer shard {ckpt_dir / f} is corrupt or truncated ({type(e).__name__})") from None
        ranges = sd.get("slices", {})
        for key, into in (("state", "pieces"), ("masters", "master_pieces")):
            for n, v in sd.get(key, {}).items():
                if n in wanted[j]:
                    a, b = ranges[n][:2] if n in ranges else (0, opt.layout.numel[n])
                    merged[into].setdefault(n, []).append((a, b, v))
    opt.load_state_dict(merged)
    if opt.lowrank and opt.distributed:      # non-owners' bases are not saved: rebuild them from the owners
        opt._share_projected_state()
