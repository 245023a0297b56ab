"""Whole-matrix ownership: a ZeRO-style sharded optimizer that projected (GaLore/RGP) optimizers can live in.

Why not DeepSpeed's own stage 1/2. Stock ZeRO-1/2 flattens every parameter group into one buffer and
cuts it into W equal element ranges with no regard for parameter boundaries; the client optimizer is
handed one 1-D fp32 slice per group. A GaLore/RGP update needs the whole 2-D gradient of a matrix
(its SVD or randomized range finder), so a slice that ends half-way through `q_proj` is useless.
DeepSpeed's Muon support (`use_muon` in `stage_1_and_2.py`) works around the same problem by running
Newton-Schulz on the full accumulated gradient of every matrix touching a rank's range inside the
gradient path: matrices straddling two ranks are computed twice, their momentum lives in a side
buffer outside the partition layout (and outside its checkpoints), and doing 2-D math before the
overflow check and clipping caused a string of bugs (#8432, #8439, #8441). We want none of that.

The mechanism. Every parameter is owned by exactly one data-parallel rank (`optim/ownership.py`, greedy
longest-processing-time packing over two loads at once, the basis-refresh cost and the optimizer
state bytes, deterministic from shapes, world size and optimizer config alone). Each rank builds the
ordinary single-process optimizer (`optim.build_optimizer`) over the parameters it owns only, so the
owner alone keeps that matrix's moments, basis and (for bf16 weights) fp32 master copy, and the owner
alone computes its SVD/RSVD and update. Gradients reach owners by an all-reduce (ZeRO-1 semantics) or
a reduce to the owner after which the other ranks free them (ZeRO-2 semantics); after the step each
owner broadcasts its updated parameters. Because each parameter's update depends only on its own
gradient and state (and RGP's random test matrix only on its name and refresh step), N ranks compute
exactly the update one process would with the same averaged gradient: the result differs from a
single process only by the floating-point order of the gradient sum. Clipping uses the same global
norm as `torch.nn.utils.clip_grad_norm_` (per-tensor norms gathered in model order, so it is even
bit-identical). This is the design of torch's `ZeroRedundancyOptimizer` and Megatron's
`LayerWiseDistributedOptimizer`; it stops scaling once W approaches the number of matrices.

Under DeepSpeed the engine runs at stage 0 with its own gradient all-reduce switched off
(`optim/deepspeed_glue.py`); this object is its client optimizer and does the communication.
Without DeepSpeed the trainer calls it directly; at world size 1 it is a pass-through.

Who does what. The files: the plan in `optim/ownership.py`; every collective in `optim/comm.py` (each one
counted by an optional `CommLedger`: `opt.ledger = CommLedger(world)`); this file the wrapper and its
checkpoints. torch.distributed moves the bytes (all-reduce / reduce / broadcast on flat buckets of at most
BUCKET_BYTES, in the parameters' device); DeepSpeed, when used, only runs forward/backward and calls step().
DDP's reducer and DeepSpeed's ZeRO partitioner are not used: both cut buffers at element boundaries that
ignore matrices, and whole-matrix ownership needs each owner to receive whole matrices. Gradients travel in
`optim.comm_dtype` ("auto": the weights' dtype, so bf16 for a bf16 model, as DDP does) and are averaged in
fp32 on arrival.

Per optimizer step (build the wrapper after torch.distributed is initialised; always wrap, also at 1 rank):
    plain torchrun / one process:
        (loss / grad_accum).backward() for each micro-batch
        opt.sync_gradients(); norm = opt.clip_grad_norm_(max_norm); opt.step(); opt.zero_grad()
    DeepSpeed (engine from optim.deepspeed_glue.init_deepspeed):
        engine.backward(loss) for each micro-batch      (the engine divides by gradient_accumulation_steps)
        opt.sync_gradients(); norm = opt.clip_grad_norm_(ds.grad_clip)   (else engine.step() does both)
        engine.step(); opt.zero_grad()                  (engine.step() -> opt.step(), once per call)
    LR: set group["lr"] on every entry of opt.param_groups.
Checkpoints: `save_optimizer_shards(opt, dir)` / `load_optimizer_shards(opt, dir)` on every rank;
the state is keyed by parameter name, so a run resumes on a different number of ranks.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import weakref
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.distributed as dist

import checkpoint_files
import warnings

from optim import comm
from optim import projection as proj
from optim import validate_optim_config
from optim.adam import apply_lowrank_update, is_projected, set_basis
from optim.comm import CommLedger
from optim.ownership import describe_disagreement, plan_ownership, run_signature

FORMAT_VERSION = 1
BUCKET_BYTES = 64 * 2**20          # flatten gradients / weights into collectives of at most this size
GRAD_BUCKET_BYTES = 16 * 2**20     # gradient buckets sent during backward (smaller: less held, earlier overlap)
MAX_INFLIGHT = 1                   # gradient buckets in flight besides the newest (each holds a wire buffer)


# --------------------------------------------------------------------------------------------------
# The wrapper

def _default_builder(named, cfg):
    import optim as _optim
    return _optim.build_optimizer(named, cfg)


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


class ShardedOptimizer:
    """Each parameter's optimizer state, basis and update live on its owner rank only (see module doc).

    named_params: [(name, param)] in the same order on every rank (model order).
    build_inner(owned_named_params, cfg) -> torch.optim.Optimizer, called with this rank's share.
    grad_mode: "allreduce" (ZeRO-1: every rank gets the averaged gradient) or "reduce" (ZeRO-2: only
    the owner gets it, other ranks free theirs).
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
        # Overlapped reduction ("Gradients during backward" below): fixed owner buckets, launched from hooks
        self.overlap = self.distributed and not self.lowrank
        self.track_grad_memory = False                # measure grad_bytes_peak (tests, bench): costs a loop per hook
        self.async_weights = False                    # step() only starts the weight broadcasts (broadcast_weights)
        self._weights_inflight: list = []
        self.grad_bytes_peak = 0
        self._no_sync = False
        shapes = {n: tuple(p.shape) for n, p in self.named}
        self.plan = plan_ownership(shapes, self.world_size, cfg)
        self.owned = [(n, p) for n, p in self.named if self.plan[n] == self.rank]
        self._owned_map = dict(self.owned)
        self._live: list[str] = []
        # fp32 masters for low-precision weights, owner only
        self.masters: dict[str, torch.Tensor] = {}
        for n, p in self.owned:
            if p.dtype in (torch.bfloat16, torch.float16):
                self.masters[n] = p.detach().clone().float().requires_grad_(True)
        inner_named = [(n, self.masters.get(n, p)) for n, p in self.owned]
        build_inner = build_inner or _default_builder
        self.inner = build_inner(inner_named, cfg) if inner_named else None
        self._empty_groups = [{"params": [], "names": [], "lr": cfg.lr}]
        self._inner_names = {id(t): n for n, t in inner_named}
        # under DeepSpeed, engine.step() calls step() only: sync + clip then happen inside it
        self.sync_in_step = False
        self.clip_in_step = 0.0
        self.last_grad_norm: torch.Tensor | None = None
        self._global_grad_norm = None
        self._synced = False
        self._clipped = False
        if self.distributed:
            self._check_ranks_agree()
        if self.overlap:
            self._build_buckets()
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
        """Every rank computes the ownership plan on its own; ranks launched with different models or optimizer
        settings would issue mismatched collectives (a hang or silent corruption). Compare a hash of what the
        plan and the collectives depend on, and stop every rank with one line naming the first difference."""
        sig = run_signature(self.named, self.cfg, self.world_size, self.grad_mode)
        digest = hashlib.sha256(json.dumps(sig, sort_keys=True, default=str).encode()).digest()
        mine = torch.tensor([int.from_bytes(digest[:8], "little", signed=True)], dtype=torch.int64, device=self.device)
        everyone = mine.repeat(self.world_size)          # a no-op collective (the fake process group) keeps them equal
        comm.all_gather_single(everyone, mine, self.group, self.ledger, "signature")
        if bool((everyone == mine).all()):
            return
        sigs: list = [None] * self.world_size
        dist.all_gather_object(sigs, sig, group=self.group)
        raise ValueError(describe_disagreement(sigs))

    # -- what torch.optim.Optimizer users expect ---------------------------------------------------
    @property
    def param_groups(self) -> list[dict]:
        # A new list of the inner optimizer's group dicts: setting group["lr"] reaches the inner optimizer,
        # while list surgery by callers (DeepSpeed drops empty groups in place) cannot change its layout.
        return list(self.inner.param_groups) if self.inner is not None else list(self._empty_groups)

    @property
    def state(self):
        return self.inner.state if self.inner is not None else {}

    def _grad_holder(self, name: str, p: torch.Tensor) -> torch.Tensor:
        return self.masters.get(name, p)

    # -- gradients ---------------------------------------------------------------------------------
    @torch.no_grad()
    def sync_gradients(self) -> None:
        """Average gradients over ranks (all-reduce, or reduce to owners); fp32 grads land on masters.
        Once per step: a second call before step()/zero_grad() does nothing."""
        if self._synced:
            return
        self.wait_for_weights()
        if not self.distributed:
            if dist.is_available() and dist.is_initialized() and dist.get_world_size(self.group) > 1:
                raise RuntimeError("this ShardedOptimizer was built before torch.distributed was initialised; "
                                   "build it after init_process_group so it shards across the ranks")
            self._live = [n for n, p in self.named if p.grad is not None]
            self._grads_to_masters()
            self._synced = True
            return
        if self.overlap:
            self._finish_backward()
            self._synced = True
            return
        wire = torch.empty((), dtype=self.comm_dtype).element_size()
        present = torch.tensor([p.grad is not None for _, p in self.named], dtype=torch.int32, device=self.device)
        comm.all_reduce(present, self.group, self.ledger, "flags", op=dist.ReduceOp.MAX)
        live = [(n, p) for (n, p), f in zip(self.named, present.tolist()) if f]
        self._live = [n for n, _ in live]
        if self.lowrank:
            low_rank = set(self.projected)
            self._sync_projected([(n, p) for n, p in live if n in low_rank], wire)
            live = [(n, p) for n, p in live if n not in low_rank]
        if self.grad_mode == "allreduce":
            for bucket in _buckets(live, lambda np_: np_[1].numel() * wire):
                self._reduce_bucket(bucket, dst=None)
        else:
            for owner in range(self.world_size):
                mine = [(n, p) for n, p in live if self.plan[n] == owner]
                for bucket in _buckets(mine, lambda np_: np_[1].numel() * wire):
                    self._reduce_bucket(bucket, dst=owner)
            for n, p in self.named:
                if self.plan[n] != self.rank:
                    p.grad = None
        self._grads_to_masters()
        self._synced = True

    def _reduce_bucket(self, bucket, dst):
        cdt = self.comm_dtype
        grads = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).to(cdt) for _, p in bucket]
        flat = torch.cat(grads) if len(grads) > 1 else grads[0].clone()
        if dst is None:
            comm.all_reduce(flat, self.group, self.ledger, "grads")
        else:
            comm.reduce(flat, dst, self.group, self.ledger, "grads")
            if dst != self.rank:
                return
        flat = flat.float().div_(self.world_size)     # averaged in fp32 whatever the wire dtype
        off = 0
        for n, p in bucket:
            k = p.numel()
            g = flat[off:off + k].view_as(p)
            off += k
            if n in self.masters:
                self.masters[n].grad = g.clone()
                p.grad = None
            else:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                p.grad.copy_(g)

    def _grads_to_masters(self):
        for n, master in self.masters.items():
            p = self._owned_map[n]
            if p.grad is not None:
                master.grad = p.grad.detach().float()
                p.grad = None

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Global L2 norm of the averaged gradient (as torch.nn.utils.clip_grad_norm_ computes it);
        owned gradients are scaled by min(1, max_norm / (norm + 1e-6)). max_norm <= 0: norm only."""
        if not self._synced:
            self.sync_gradients()
        idx = {n: i for i, n in enumerate(self._live)}
        norms = torch.zeros(len(idx), dtype=torch.float32, device=self.device)
        owned_grads = []
        holders = [(n, self._grad_holder(n, p)) for n, p in self.owned]
        with_grad = [(n, h) for n, h in holders if h.grad is not None]
        if with_grad:
            per = torch._foreach_norm([h.grad for _, h in with_grad], 2)
            for (n, h), v in zip(with_grad, per):
                norms[idx[n]] = v.float()
                owned_grads.append(h)
        lows = [n for n, _ in self.owned if n in self._low]      # low-rank comm: what the optimizer sees
        if lows:
            for n, v in zip(lows, torch._foreach_norm([self._low[n] for n in lows], 2)):
                norms[idx[n]] = v.float()
        if self.distributed:
            comm.all_reduce(norms, self.group, self.ledger, "norms")   # one non-zero entry per parameter: exact
        total = torch.linalg.vector_norm(norms, 2)
        if max_norm > 0 and owned_grads:
            torch.nn.utils.clip_grads_with_norm_([h for h in owned_grads], max_norm, total)
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
            self._owned_map[n].copy_(master)
            master.grad = None
        self.broadcast_weights()
        self._synced = self._clipped = False

    @torch.no_grad()
    def broadcast_weights(self) -> None:
        """Every owner sends its (updated) parameters to the other ranks, in the parameters' dtype, coalesced
        into buckets of at most BUCKET_BYTES per owner. Called by step(); nothing to do on one process.
        With `async_weights` (train.py sets it) the broadcasts are only started: the caller overlaps them with
        loading the next batch and must call wait_for_weights() before anything reads the weights (the
        forward, an evaluation, a checkpoint); this wrapper's own entry points wait by themselves."""
        self.wait_for_weights()
        if not self.distributed:
            return
        local = set(self.replicas)                 # lowrank_update: every rank updated these itself
        for owner in range(self.world_size):
            params = [p for n, p in self.named if self.plan[n] == owner and n not in local]
            for bucket in _buckets(params, lambda p: p.numel() * p.element_size()):
                self._broadcast_bucket(bucket, owner)

    def _broadcast_bucket(self, params, owner):
        by_dtype: dict[torch.dtype, list] = {}
        for p in params:
            by_dtype.setdefault(p.dtype, []).append(p)
        for ps in by_dtype.values():
            flat = torch.cat([p.detach().reshape(-1) for p in ps]) if owner == self.rank else \
                torch.empty(sum(p.numel() for p in ps), dtype=ps[0].dtype, device=ps[0].device)
            work = comm.broadcast(flat, owner, self.group, self.ledger, "weights", async_op=self.async_weights)
            if owner != self.rank:
                self._weights_inflight.append((work, flat, ps))
        if not self.async_weights:
            self.wait_for_weights()

    @torch.no_grad()
    def wait_for_weights(self) -> None:
        """Finish the weight broadcasts started by step() (async_weights): received values land in the params."""
        for work, flat, ps in self._weights_inflight:
            if work is not None:
                work.wait()
            off = 0
            for p in ps:
                p.copy_(flat[off:off + p.numel()].view_as(p))
                off += p.numel()
        self._weights_inflight = []

    def zero_grad(self, set_to_none: bool = True) -> None:
        if self.overlap and not self._synced and (self._next_bucket or self._inflight):
            self._finish_backward()        # buckets already sent must be matched on every rank, then dropped
        if self.overlap:
            self._acc.clear()
            self._seen.clear()
        for _, p in self.named:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()
        for m in self.masters.values():
            m.grad = None
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
                m.copy_(self._owned_map[n].float())

    # -- Gradients during backward ------------------------------------------------------------------
    # Parameters are packed, in reverse model order (the order backward produces their gradients), into buckets
    # of at most BUCKET_BYTES that each belong to one owner. A post-accumulate-grad hook counts a parameter in;
    # when a bucket is complete its reduction (to the owner; all-reduce in "allreduce" mode) starts at once,
    # asynchronously, so communication overlaps the rest of backward. Buckets start strictly in their fixed
    # order, so every rank issues the same collectives in the same order (NCCL requires it). As with DDP
    # without find_unused_parameters, every rank must produce the same parameters' gradients in a micro-batch
    # (a LLaMA uses all of its parameters); a parameter without a gradient anywhere is sent as zeros once at
    # sync_gradients and then treated as absent (its grad stays None, the optimizer skips it). The
    # local gradient is copied into the bucket's wire buffer and freed at once, and the owner adds the reduced
    # bucket into an fp32 accumulator: with "reduce" (ZeRO-2) every micro-batch is reduced this way, so no
    # rank ever holds the full gradient. Inside `no_sync()` (the trainer wraps every micro-batch but the
    # last) "allreduce" (ZeRO-1) accumulates locally and reduces once, like DDP. sync_gradients() waits.

    def _build_buckets(self) -> None:
        wire = torch.empty((), dtype=self.comm_dtype).element_size()
        open_: dict[int, list] = {}
        used: dict[int, int] = {}
        self._bucket_names: list[list[str]] = []
        for n, p in reversed(self.named):
            owner = self.plan[n]
            b = open_.setdefault(owner, [])
            if b and used[owner] + p.numel() * wire > GRAD_BUCKET_BYTES:
                self._bucket_names.append(b)
                b = open_[owner] = []
                used[owner] = 0
            b.append(n)
            used[owner] = used.get(owner, 0) + p.numel() * wire
        self._bucket_names += [b for _, b in sorted(open_.items()) if b]
        self._bucket_of = {n: i for i, b in enumerate(self._bucket_names) for n in b}
        self._arrived = [0] * len(self._bucket_names)
        self._counted: set[str] = set()            # counted into its bucket during this micro-batch
        self._next_bucket = 0
        self._inflight: list = []                  # (bucket index, work, wire buffer)
        self._acc: dict[str, torch.Tensor] = {}    # fp32 sums of reduced gradients (owner; all in "allreduce")
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
        if not self.overlap:
            return
        self._seen.add(name)
        if not (self._no_sync and self.grad_mode == "allreduce") and name not in self._counted:
            self._counted.add(name)
            i = self._bucket_of[name]
            self._arrived[i] += 1
            while self._next_bucket < len(self._bucket_names) and \
                    self._arrived[self._next_bucket] == len(self._bucket_names[self._next_bucket]):
                self._launch(self._next_bucket)
        if self.track_grad_memory:
            self._note_grad_memory()

    def _launch(self, i: int) -> None:
        names = self._bucket_names[i]
        params = [self._params[n] for n in names]
        grads = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).to(self.comm_dtype)
                 for p in params]
        # One parameter: its gradient's own storage is the wire buffer (no copy); it is released from .grad below
        flat = torch.cat(grads) if len(grads) > 1 else grads[0]
        for p in params:
            p.grad = None                          # its values are in the bucket now
        owner = self.plan[names[0]]
        if self.grad_mode == "allreduce":
            work = comm.all_reduce(flat, self.group, self.ledger, "grads", async_op=True)
        else:
            work = comm.reduce(flat, owner, self.group, self.ledger, "grads", async_op=True)
        self._inflight.append((i, work, flat))
        while len(self._inflight) > MAX_INFLIGHT:  # bound the wire buffers alive at once
            self._wait_oldest()
        self._next_bucket += 1
        if self._next_bucket == len(self._bucket_names):     # every bucket of this micro-batch is out
            self._next_bucket = 0
            self._arrived = [0] * len(self._bucket_names)
            self._counted.clear()
            if self.track_grad_memory:
                self._note_grad_memory()
            self._wait_all()                       # before the next micro-batch reuses the buckets

    def _wait_all(self) -> None:
        while self._inflight:
            self._wait_oldest()

    def _wait_oldest(self) -> None:
        i, work, flat = self._inflight.pop(0)
        work.wait()
        names = self._bucket_names[i]
        if self.plan[names[0]] != self.rank:
            return          # not ours: dropped (also after an all-reduce: only the owner uses a gradient)
        flat = flat.float().div_(self.world_size)  # averaged in fp32 whatever the wire dtype
        off = 0
        for n in names:
            k = self._params[n].numel()
            g = flat[off:off + k]
            off += k
            if n in self._acc:
                self._acc[n].add_(g)
            else:
                self._acc[n] = g                   # a view: the buffer becomes the accumulator, no copy

    def _finish_backward(self) -> None:
        """Start every bucket not started yet (in order), wait, and hand the averaged gradients over."""
        # A round in progress, or gradients not yet counted into a complete bucket: finish the round. Whether
        # that is so is the same on every rank when every rank uses the same parameters (module docstring).
        if self._next_bucket or self._counted or self._pending_local():
            for j in range(self._next_bucket, len(self._bucket_names)):
                self._launch(j)
        self._wait_all()
        present = torch.tensor([n in self._seen for n, _ in self.named], dtype=torch.int32, device=self.device)
        comm.all_reduce(present, self.group, self.ledger, "flags", op=dist.ReduceOp.MAX)
        self._live = [n for (n, _), f in zip(self.named, present.tolist()) if f]
        live = set(self._live)
        for n, p in self.named:
            acc = self._acc.pop(n, None)
            if acc is None or n not in live:
                p.grad = None
            elif n in self.masters:
                self.masters[n].grad = acc.view_as(p)
                p.grad = None
            else:
                p.grad = acc.view_as(p).to(p.dtype)      # (no copy for fp32 weights)
        self._acc.clear()
        self._seen.clear()

    def _pending_local(self) -> bool:
        return any(p.grad is not None for p in self._params.values())

    def _note_grad_memory(self) -> None:
        held = sum(p.grad.numel() * p.grad.element_size() for p in self._params.values() if p.grad is not None)
        held += sum(t.numel() * t.element_size() for t in self._acc.values())
        held += sum(f.numel() * f.element_size() for _, _, f in self._inflight)
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
                holder = self._grad_holder(n, self._owned_map[n])
                set_basis(self.inner.state[holder], basis, self.sides[n], self.cfg.moments_on_refresh)
            self.bases[n] = basis
        for n, low in self._low.items():
            self.inner.prepared[self._grad_holder(n, self._owned_map[n])] = low
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
        wire = torch.empty((), dtype=self.comm_dtype).element_size()
        for owner in range(self.world_size):
            mine = [n for n in stepped if self.plan[n] == owner]
            shapes = {n: self._low_shape(n) for n in mine}
            for bucket in _buckets(mine, lambda n: math.prod(shapes[n]) * wire):
                if owner == self.rank:
                    got = [self.inner.updates.pop(self._grad_holder(n, self._owned_map[n]), None)
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
                st = self.inner.state.get(self._grad_holder(n, self._owned_map[n]), {})
                if st.get("basis") is not None:
                    steps[i] = int(st.get("step", 0)) + 1
        comm.all_reduce(steps, self.group, self.ledger, "resume")
        self.bases.clear()
        for i, n in enumerate(self.projected):
            count = int(steps[i])
            self.proj_steps[n] = max(count - 1, 0)
            if count:
                p = self._owned_map.get(n)
                mine = self.plan[n] == self.rank
                basis = self.inner.state[self._grad_holder(n, p)]["basis"] if mine else None
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
        """This rank's owned state keyed by parameter name, plus the plan and world size."""
        self.wait_for_weights()
        out = {"format": FORMAT_VERSION, "world_size": self.world_size, "rank": self.rank,
               "optimizer": self.cfg.name, "plan": dict(self.plan), "state": {}, "masters": {},
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
        """Load states by name for the parameters this rank owns (the dict may hold more names, e.g. a
        merge of several ranks' files, or come from a different world size)."""
        self.wait_for_weights()
        unknown = set(sd.get("plan", {})) ^ {n for n, _ in self.named}
        if sd.get("plan") and unknown:
            raise ValueError(f"optimizer checkpoint does not match the model: parameter names differ, "
                             f"e.g. {sorted(unknown)[0]!r}")
        self.refresh_masters()
        for n, m in sd.get("masters", {}).items():
            if n in self.masters:
                self.masters[n].data.copy_(m)
        if self.inner is None:
            return
        names = self._index_names()
        cur = self.inner.state_dict()
        state = {i: sd["state"][n] for i, n in enumerate(names) if n in sd["state"]}
        self.inner.load_state_dict({"state": state, "param_groups": cur["param_groups"]})

    def state_bytes(self) -> int:
        """Bytes of this rank's optimizer state tensors plus its fp32 master copies."""
        inner = tensor_bytes(list(self.inner.state.values())) if self.inner is not None else 0
        return inner + sum(tensor_bytes(m) for m in self.masters.values())

    def __repr__(self):
        return (f"ShardedOptimizer(rank {self.rank}/{self.world_size}, {self.grad_mode}, "
                f"owns {len(self.owned)}/{len(self.named)} params, inner={type(self.inner).__name__})")


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
                        "files": [checkpoint_files.optim_file(r) for r in range(opt.world_size)], "plan": opt.plan}
            path = ckpt_dir / checkpoint_files.OPTIM_MANIFEST
            tmp = path.with_name(path.name + ".tmp")
            checkpoint_files.write_text(tmp, json.dumps(manifest, indent=1))
            os.replace(tmp, path)
        checkpoint_files.fsync(ckpt_dir)
    finally:
        if opt.distributed:
            dist.barrier(group=opt.group)


def load_optimizer_shards(opt: ShardedOptimizer, ckpt_dir) -> None:
    """Load the states of the parameters this rank owns now, from whichever rank files hold them.

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
    need = {n for n, _ in opt.owned}
    files = sorted({manifest["files"][plan[n]] for n in need})
    merged = {"plan": plan, "state": {}, "masters": {}}
    for f in files:
        try:
            sd = torch.load(ckpt_dir / f, map_location="cpu", weights_only=True)
        except Exception as e:   # torch raises several classes for a truncated or foreign file
            raise ShardFileError(f"optimizer shard {ckpt_dir / f} is corrupt or truncated ({type(e).__name__})") from None
        for key in ("state", "masters"):
            merged[key].update({n: v for n, v in sd[key].items() if n in need})
    opt.load_state_dict(merged)
    if opt.lowrank and opt.distributed:      # non-owners' bases are not saved: rebuild them from the owners
        opt._share_projected_state()
