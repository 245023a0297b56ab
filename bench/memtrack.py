"""Peak memory of one training step by category, measured with fake tensors, next to tools/estimate_memory.py.

    python bench/memtrack.py                                   # 60m and 1b, bf16, micro batch 16 x 256 (~15 s)
    python bench/memtrack.py --model tiny --dtype fp32 --micro-batch 4 --seq-len 128 --vocab 8192
    python bench/memtrack.py --model 60m --dtype fp32 --attention math
    python bench/memtrack.py --model 60m --grad-accum 2            # gradients of micro-batch 1 alive in backward 2

One JSON line per configuration:
    {"bench": "memtrack", "model": "1b", ..., "measured": {...}, "estimate": {...}, "ratio": {...}}
ratio = estimate / measured for activations, backward peak, step peak, peak, weights, grads, optimizer state,
fp32 masters and the loss's backward temporaries. "notes" flags a comparison that is not like for like (bf16 math
attention on CPU; a backward peak at the end of backward, where few activations are left).

How it measures (no memory is allocated, so the 1B model runs on a laptop):
* the model is built on the meta device, cast to --dtype, and inside FakeTensorMode `to_empty` gives it fake CPU
  tensors: real shapes, dtypes and storages, no bytes. Every op runs its meta kernel only.
* the optimizer is the trainer's own: `optim.sharded.ShardedOptimizer` over `adamw` at world size 1 (fp32
  moments, fp32 master copies of bf16 weights), exactly what train.py builds. Its adamw path has no
  data-dependent call (`.item()`), so it runs on fake tensors.
* steady state: one untracked warm-up step with zero gradients creates the moments first, because from step 2
  on they are alive during the backward peak (step 1's backward is lower by the optimizer state).
* phase "backward": `torch.distributed._tools.mem_tracker.MemTracker` around forward + backward (x --grad-accum
  micro-batches), with `_, loss = model(x, y)` as train.py calls it: `_` keeps the logits alive until the next
  forward, through backward and the step, and so does this measurement. Its peak snapshot
  splits the bytes alive at the peak into Parameter, Buffer, Gradient, Activation (made in forward and still
  alive: what autograd saved), Temp (made in backward), Optstate and Other (the fp32 masters, passed in with
  track_external). The gradients after backward are read from a "current" snapshot.
* phase "step": a second MemTracker around sync_gradients + clip_grad_norm_(1.0) + step + zero_grad, as train.py
  (its Other category, "masters" in measured_step_by_category, also holds the last logits).
* attention: F.scaled_dot_product_attention on fake CPU tensors dispatches to
  aten._scaled_dot_product_flash_attention_for_cpu (recorded in "sdpa_ops"). It saves q, k, v, the output and
  a (B, H, T) fp32 logsumexp, the same set as the CUDA flash kernel (and CUDA's memory-efficient kernel that
  fp32 gets on a GPU), and allocates its output in q's memory layout as the CUDA kernels do: q keeps the
  projection's (B, T, H, hd) layout through RoPE, so o_proj's reshape is a view on both. So "flash" here is
  like-for-like with a GPU run. --attention math forces the math kernel:
  on CPU it upcasts bf16 q, k, v to fp32 (a CPU-only path; the GPU math kernel stays in bf16), so compare the
  math kernel in fp32 only.
Not measured (nor estimated): the CUDA context, cuBLAS/flash workspaces, allocator caching and fragmentation.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tools.estimate_memory import estimate, model_dims  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
# MemTracker's category names (torch.distributed._tools.mem_tracker._MemRefType values) -> our JSON keys
CATEGORIES = {"Parameter": "parameters", "Buffer": "buffers", "Gradient": "gradients", "Activation": "activations",
              "Temp": "temporaries", "Optstate": "optimizer_state", "Other": "masters", "Total": "total"}


def _by_category(snapshot: dict) -> dict:
    """MemTracker snapshot {device: {category: bytes}} -> {our key: bytes} (fake tensors live on one device)."""
    out = dict.fromkeys(CATEGORIES.values(), 0)
    for per_device in snapshot.values():
        for cat, nbytes in per_device.items():
            out[CATEGORIES[getattr(cat, "value", cat)]] += nbytes
    return out


class _SdpaOps(torch.utils._python_dispatch.TorchDispatchMode):
    """Records which attention kernels ran (the flash / math question of the module docstring)."""

    def __init__(self):
        super().__init__()
        self.ops: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        if "attention" in name or "softmax" in name:
            self.ops.add(name)
        return func(*args, **(kwargs or {}))


def measure(model: str = "60m", dtype: str = "bf16", micro_batch: int = 16, seq_len: int = 256, vocab: int = 32000,
            grad_accum: int = 1, attention: str = "flash") -> dict:
    """Measured bytes of one steady-state training step (world size 1, adamw, ShardedOptimizer as train.py builds
    it), by phase and MemTracker category; see the module docstring."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from config import OptimConfig
    from model.llama import Llama, LlamaArgs
    from optim.sharded import ShardedOptimizer

    with torch.device("meta"):
        net = Llama(LlamaArgs(**model_dims(model, vocab, seq_len))).to(DTYPES[dtype])
    kernel = sdpa_kernel(SDPBackend.MATH) if attention == "math" else contextlib.nullcontext()
    with FakeTensorMode(allow_non_fake_inputs=True):
        net.to_empty(device="cpu")
        opt = ShardedOptimizer(net.named_parameters(), OptimConfig(name="adamw"))
        # warm-up step: creates the moments, so the tracked step is a steady-state one
        for p in net.parameters():
            p.grad = torch.zeros_like(p)
        opt.sync_gradients()
        opt.step()
        opt.zero_grad(set_to_none=True)
        batches = [(torch.randint(0, vocab, (micro_batch, seq_len)), torch.randint(0, vocab, (micro_batch, seq_len)))
                   for _ in range(grad_accum)]
        masters = list(opt.masters.values())

        backward = MemTracker()
        backward.track_external(net, opt.inner, *masters)
        sdpa = _SdpaOps()
        with backward, kernel, sdpa:
            for i, (x, y) in enumerate(batches):
                if i:
                    backward.reset_mod_stats()   # MemTracker refuses a second root forward without this
                logits, loss = net(x, y)         # train.py's `_, loss = model(x, y)` holds the logits likewise
                (loss / grad_accum).backward()
                del loss
            after_backward = backward.get_tracker_snapshot("current")

        step = MemTracker()
        step.track_external(net, opt.inner, *masters, logits)     # logits: category Other, with the masters
        with step:
            opt.sync_gradients()
            opt.clip_grad_norm_(1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

    bwd = _by_category(backward.get_tracker_snapshot("peak"))
    stp = _by_category(step.get_tracker_snapshot("peak"))
    return {"backward": bwd, "step": stp, "peak": max(bwd["total"], stp["total"]),
            "grads_after_backward": _by_category(after_backward)["gradients"], "sdpa_ops": sorted(sdpa.ops)}


def compare(model: str = "60m", dtype: str = "bf16", micro_batch: int = 16, seq_len: int = 256, vocab: int = 32000,
            grad_accum: int = 1, attention: str = "flash") -> dict:
    """measure() next to estimate() for the same run (adamw, world size 1, ZeRO 0), and their ratios."""
    t0 = time.perf_counter()
    got = measure(model, dtype, micro_batch, seq_len, vocab, grad_accum, attention)
    seconds = time.perf_counter() - t0
    est = estimate(model=model, optim="adamw", world_size=1, zero=0, micro_batch=micro_batch, seq_len=seq_len,
                   dtype=dtype, vocab=vocab, attention=attention, grad_accum=grad_accum)
    bwd = got["backward"]
    measured = {"activations": bwd["activations"], "peak_backward": bwd["total"], "peak_step": got["step"]["total"],
                "peak": got["peak"], "weights": bwd["parameters"], "grads": got["grads_after_backward"],
                "optimizer_state": bwd["optimizer_state"], "masters": bwd["masters"],
                "backward_temporaries": bwd["temporaries"]}
    estimated = {"activations": est["activations_estimate"], "peak_backward": est["peak_backward"],
                 "peak_step": est["peak_step"], "peak": est["peak"], "weights": est["weights"],
                 "grads": est["grads_backward"], "optimizer_state": est["optimizer_state"], "masters": est["masters"],
                 "backward_temporaries": est["loss_backward_temporaries"]}
    ratio = {k: round(estimated[k] / measured[k], 4) for k in measured if measured[k]}
    notes = []
    if attention == "math" and dtype == "bf16":
        notes.append("CPU math attention upcasts bf16 q, k, v and the softmax to fp32 (a GPU keeps bf16): "
                     "activations are measured higher than a GPU run's; compare math attention in fp32")
    if grad_accum == 1 and bwd["gradients"]:
        notes.append("backward peak at the end of backward (all gradients): measured activations are only what "
                     "is left then, not comparable with the estimate's start-of-backward activations")
    return {"bench": "memtrack", "model": model, "dtype": dtype, "micro_batch": micro_batch, "seq_len": seq_len,
            "vocab": vocab, "grad_accum": grad_accum, "attention": attention, "optim": "adamw", "world_size": 1,
            "zero": 0, "sdpa_ops": got["sdpa_ops"], "measured": measured, "estimate": estimated, "ratio": ratio,
            "notes": notes,
            "measured_backward_by_category": bwd, "measured_step_by_category": got["step"],
            "seconds": round(seconds, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", nargs="+", default=["60m", "1b"], help="sizes in configs/models (tiny, 60m, ..., 1b)")
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    ap.add_argument("--micro-batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--attention", default="flash", choices=("flash", "math"))
    args = ap.parse_args(argv)
    for model in args.model:
        print(json.dumps(compare(model, args.dtype, args.micro_batch, args.seq_len, args.vocab, args.grad_accum,
                                 args.attention)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
