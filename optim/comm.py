"""The sharded optimizer's collectives, each counted in a ledger of bytes.

Every collective `optim/sharded.py` issues goes through the functions here, which call `torch.distributed`
and, when a `CommLedger` is attached, record (operation, dtype, payload bytes, bytes this rank sends). The
bytes sent are those of the ring algorithms NCCL and gloo use, per rank, for a payload of N bytes:

    all-reduce                       2 (W - 1) / W x N
    reduce-scatter, all-gather       (W - 1) / W x N      (N: the whole gathered / scattered buffer)
    broadcast, reduce                N                    (pipelined ring/tree: every rank forwards it once)

`ddp_bytes` and `zero2_bytes` give the same figure for the two references a reader compares with: DDP's
all-reduce of every gradient, and DeepSpeed ZeRO-2's reduce-scatter of every micro-batch's gradients plus the
all-gather of the updated weights.
"""
from __future__ import annotations

import collections
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

RING_FACTOR = {"all_reduce": lambda w: 2 * (w - 1) / w, "reduce_scatter": lambda w: (w - 1) / w,
               "all_gather": lambda w: (w - 1) / w, "broadcast": lambda w: 1.0, "reduce": lambda w: 1.0}


def ring_bytes(op: str, payload_bytes: int, world: int) -> float:
    """Bytes one rank sends for `op` on a payload of `payload_bytes` (the module docstring's table)."""
    return 0.0 if world <= 1 else RING_FACTOR[op](world) * payload_bytes


def ddp_bytes(numel: int, world: int, dtype_bytes: int = 2, micro_batches: int = 1) -> float:
    """DDP: one all-reduce of every gradient per optimizer step (no_sync() during accumulation)."""
    del micro_batches                     # DDP under no_sync() communicates once per optimizer step
    return ring_bytes("all_reduce", numel * dtype_bytes, world)


def zero2_bytes(numel: int, world: int, dtype_bytes: int = 2, micro_batches: int = 1) -> float:
    """DeepSpeed ZeRO-2: reduce-scatter of the gradients at every micro-batch, all-gather of the weights."""
    return micro_batches * ring_bytes("reduce_scatter", numel * dtype_bytes, world) + \
        ring_bytes("all_gather", numel * dtype_bytes, world)


@dataclass
class CommRecord:
    op: str               # all_reduce, reduce, broadcast, all_gather, reduce_scatter
    dtype: str
    payload_bytes: int
    sent_bytes: float     # by this rank, ring model
    tag: str = ""         # what it carried: flags, grads, norms, weights, signature


@dataclass
class CommLedger:
    """What one rank's sharded optimizer sent. `records` in order; `totals()` sums by tag and op."""
    world: int
    records: list[CommRecord] = field(default_factory=list)

    def add(self, op: str, tensor: torch.Tensor, tag: str) -> None:
        payload = tensor.numel() * tensor.element_size()
        self.records.append(CommRecord(op, str(tensor.dtype).removeprefix("torch."), payload,
                                       ring_bytes(op, payload, self.world), tag))

    def totals(self) -> dict:
        by_tag = collections.defaultdict(float)
        by_op = collections.defaultdict(float)
        for r in self.records:
            by_tag[r.tag] += r.sent_bytes
            by_op[f"{r.op}:{r.dtype}"] += r.sent_bytes
        return {"sent_bytes": sum(r.sent_bytes for r in self.records), "calls": len(self.records),
                "by_tag": dict(by_tag), "by_op": dict(by_op)}

    def clear(self) -> None:
        self.records.clear()


def _global(group, rank: int) -> int:
    return dist.get_global_rank(group, rank) if group is not None else rank


def all_reduce(t: torch.Tensor, group, ledger: CommLedger | None, tag: str, op=dist.ReduceOp.SUM,
               async_op: bool = False):
    if ledger is not None:
        ledger.add("all_reduce", t, tag)
    return dist.all_reduce(t, op=op, group=group, async_op=async_op)


def reduce(t: torch.Tensor, dst: int, group, ledger: CommLedger | None, tag: str, async_op: bool = False):
    """Sum into group rank `dst` (a group-local rank). With async_op, the work handle to wait on."""
    if ledger is not None:
        ledger.add("reduce", t, tag)
    return dist.reduce(t, dst=_global(group, dst), group=group, async_op=async_op)


def broadcast(t: torch.Tensor, src: int, group, ledger: CommLedger | None, tag: str, async_op: bool = False):
    """From group rank `src` (a group-local rank) to every rank. With async_op, the work handle to wait on."""
    if ledger is not None:
        ledger.add("broadcast", t, tag)
    return dist.broadcast(t, src=_global(group, src), group=group, async_op=async_op)


# gloo (CPU) runs reduce-scatter and all-gather far slower than the all-reduce and broadcasts that carry the same
# result (2 ranks, 16 MB fp32, one thread each: reduce-scatter 55.8 ms vs all-reduce 25.0 ms, all-gather 28.6 ms
# vs broadcasts 13.1 ms), so on CPU tensors under gloo those stand in. The ledger still counts the operation
# asked for: it models the ring algorithms NCCL runs, which is where the bytes matter.
def _on_gloo(t: torch.Tensor, group) -> bool:
    return t.device.type == "cpu" and "gloo" in str(dist.get_backend(group))


class _Then:
    """A work handle that finishes a stand-in collective: waits for its parts, then runs `then`."""

    def __init__(self, works: list, then):
        self.works, self.then = works, then

    def wait(self) -> bool:
        for w in self.works:
            w.wait()
        self.then()
        return True


def all_gather_single(out: torch.Tensor, t: torch.Tensor, group, ledger: CommLedger | None, tag: str,
                      async_op: bool = False):
    """Every rank's `t` concatenated, in rank order, into `out` (W x t.numel() values)."""
    if ledger is not None:
        ledger.add("all_gather", out, tag)
    if not _on_gloo(t, group):
        return dist.all_gather_single(out, t, group=group, async_op=async_op)
    rows = out.view(dist.get_world_size(group), -1)
    rows[dist.get_rank(group)].copy_(t)
    works = [dist.broadcast(row, src=_global(group, j), group=group, async_op=True) for j, row in enumerate(rows)]
    handle = _Then(works, lambda: None)
    return handle if async_op else handle.wait() and None


def reduce_scatter_single(out: torch.Tensor, t: torch.Tensor, group, ledger: CommLedger | None, tag: str,
                          async_op: bool = False):
    """Sum `t` (W equal chunks) over ranks; rank j receives chunk j in `out`. May overwrite `t`."""
    if ledger is not None:
        ledger.add("reduce_scatter", t, tag)
    if not _on_gloo(t, group):
        return dist.reduce_scatter_single(out, t, group=group, async_op=async_op)
    chunk = t.view(dist.get_world_size(group), -1)[dist.get_rank(group)]
    handle = _Then([dist.all_reduce(t, group=group, async_op=True)], lambda: out.copy_(chunk))
    return handle if async_op else handle.wait() and None
