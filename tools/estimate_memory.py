"""Per-GPU memory of a training run under our sharded optimizer's layout (docs/design.md §5), before renting GPUs.

    python tools/estimate_memory.py --model llama_1b --optim rgp8bit --rank 512 --world-size 8 --zero 2 --micro-batch 16
    python tools/estimate_memory.py --model 60m --optim adamw --world-size 1 --zero 0 --micro-batch 32 --dtype fp32
    python tools/estimate_memory.py --model llama_1b --optim rgp8bit --rank 512 --basis-dtype int8   # 8-bit bases
    python tools/estimate_memory.py --check      # estimate vs measured optimizer state (tiny and 60m, world size 1)
    python bench/memtrack.py                     # activations and peak vs a fake-tensor measurement (60m, 1b)

Prints a table (one row per component, for the worst rank) and then one JSON line with every figure in bytes.

Accounting, per rank, for the rank with the most (optimizer state + fp32 masters); names match the JSON keys:
- weights: every rank holds the full model in --dtype (ownership sharding replicates weights, like ZeRO-1/2).
- grads_backward: gradients held during backward. One process: the full gradient in --dtype. Several, ZeRO-2:
  the ShardedOptimizer sends gradient buckets to their owners from backward hooks and frees them at once
  (optim/sharded.py, "Gradients during backward"), so a rank holds its owned fp32 sums, the largest single
  gradient (made whole by autograd before it can be sent) and the buckets in transit
  ((MAX_INFLIGHT + 1) x GRAD_BUCKET_BYTES); tests/distributed/test_comm.py measures this bound. ZeRO 0/1:
  micro-batches accumulate locally (full gradient in --dtype) and the last backward sends them, owners
  summing in fp32.
- grads_step: gradients alive during the optimizer step: the owned fp32 sums (one process: in place, fp32
  masters' for bf16).
- optimizer_state: the owned share under the REAL layout (`optim.ownership.plan_layout` on the model's shapes:
  projected matrices whole, everything else sliced W ways), per parameter `optim.adam.state_bytes` (times the
  owned fraction of a sliced one), the state layout of optim/adam.py:
    adamw:        2 x 4 x numel (exp_avg, exp_avg_sq in fp32)
    adamw8bit:    numel >= 4096: 2 x numel uint8 codes + 2 x 4 x ceil(numel/256) absmax; else as adamw
    galore/rgp:   projected 2-D weights (m, n): basis min(m,n) x r (--basis-dtype: 4 bytes a value for float32,
                  2 for bfloat16, 1 for int8 plus a 4-byte scale per column) + moments of the projected gradient,
                  2 x r x max(m,n) values, fp32 or (8bit variants) uint8 codes + absmax with the same
                  4096-element rule; every other parameter (embeddings, lm_head, norms) as adamw / adamw8bit.
                  (proj_type left/right: basis and moments follow the chosen side instead of min/max.)
                  At the start rank r = optim.rank: optim.rank_decay / rank_energy only lower it later, so this
                  is the peak. optimizer_state_basis: the bases' share of optimizer_state.
- masters: fp32 copies of the owned parameters when --dtype is bf16 (4 x owned numel), 0 for fp32.
- lowrank_update_copies (--lowrank-update, bf16): fp32 copies of the projected matrices the rank does not own;
  with optim.lowrank_update every rank applies the owners' low-rank updates to its own fp32 copy.
- comm_buffer: one fp32 bucket of the gradient collectives (optim.sharded.BUCKET_BYTES, or the model if smaller).
- activations (ESTIMATE): the tensors made in forward that are alive when backward starts: what autograd saves
  in our model (model/llama.py), counted op by op, and the logits train.py holds. b = activation bytes (2 for
  bf16, 4 for fp32), per token:
    per layer:  dim x (8 + 8 b) + intermediate x 4 b + 8 + heads x 4
                each RMSNorm (two): its fp32 input (the copy made by x.float(); in fp32 the input itself) 4,
                  the normalised tensor before the weight b, its output b (saved by the next matmul), and the
                  fp32 rsqrt, one value per token;
                attention: q, k, v after RoPE 3 b and the SDPA output b, plus the kernel's fp32 logsumexp,
                  heads x 4. o_proj's input is a VIEW of the output, not a copy: q, k, v keep the projections'
                  (B, T, H, hd) memory layout through RoPE's elementwise ops, and the flash and memory-efficient
                  kernels (CPU and CUDA) allocate their output in q's layout;
                MLP: gate, silu(gate), up and their product 4 b x intermediate.
    once:       dim x (4 + 2 b) + 4 (the final norm) + vocab x (4 + b): the fp32 log-softmax saved by
                cross_entropy, and the logits: autograd does not save them, but train.py's `_, loss = model(x, y)`
                holds them in `_` until the next forward (through backward and the optimizer step).
                Not saved: the embedding output (only added to the residual).
  times micro_batch x seq_len tokens. --attention math (no flash / memory-efficient kernel): the softmax output
  b x heads x seq_len^2 per sequence per layer is saved (by softmax and by the product with v; the scores before
  it are not), scaled q and k replace q and k, the reshape for o_proj becomes a copy that replaces the output
  (same bytes), and there is no logsumexp: + b x heads x seq_len^2 - 4 x heads x seq_len per sequence per layer.
  Checked against a measurement (bench/memtrack.py, tests/tools/test_estimate_memory.py): fake tensors under
  torch's MemTracker, where SDPA runs the CPU flash kernel, which saves what the CUDA flash kernel saves.
- loss_backward_temporaries: the first backward ops hold two fp32 (tokens, vocab) tensors besides the saved
  log-softmax: nll_loss's gradient and log_softmax's input gradient, 2 x 4 x vocab per token. At the start of
  backward this is the largest transient (every layer's activations are still alive).
- peak: max(backward phase, step phase), with base = weights + optimizer_state + masters (alive all step long
  from the second step on):
    backward, --grad-accum 1: base + max(activations + loss_backward_temporaries, grads_backward). Gradients are
      None when backward starts (zero_grad(set_to_none=True)); layer by layer the activations are released as
      gradients appear, and both change linearly, so the peak is at one end: the start (activations + loss
      temporaries) or the end (every gradient).
    backward, --grad-accum > 1: base + grads_backward + activations + loss_backward_temporaries: the earlier
      micro-batches' gradients are alive through the later backward passes. The c4 recipes (global_batch 512)
      run grad_accum = 512 / (micro_batch x world size), e.g. 4 for the 1B at 16 x 8 GPUs.
    step: base + grads_step + comm_buffer + logits_held (b x vocab x tokens, the `_` above) + step_temporaries,
      the larger of: the fp32 Adam group's multi-tensor update (LowRankAdamW._step_adam_foreach: one fp32
      sqrt(v) per parameter of a chunk of at most optim.adam.FOREACH_CHUNK_NUMEL elements, so 4 x min(the
      owned numel of the non-8-bit, non-projected parameters, the chunk or the largest of them)), and the
      per-parameter paths (8-bit, GaLore/RGP projections) one parameter at a time, ~3 x 4 x the largest
      numel stepped that way.
  Not counted: allocator fragmentation, the CUDA context (~0.5-1 GiB), workspaces inside kernels.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from config import OptimConfig  # noqa: E402
from optim.adam import FOREACH_CHUNK_NUMEL, basis_bytes, is_projected, projects, state_bytes  # noqa: E402
from optim.projection import BASIS_DTYPES  # noqa: E402
from optim.ownership import plan_layout  # noqa: E402
from optim.sharded import BUCKET_BYTES, GRAD_BUCKET_BYTES, MAX_INFLIGHT, tensor_bytes  # noqa: E402

DTYPE_BYTES = {"bf16": 2, "fp32": 4}
OPTIMIZERS = ("adamw", "adamw8bit", "galore", "galore8bit", "rgp", "rgp8bit")


# --------------------------------------------------------------------------------------------- shapes

def model_dims(model: str, vocab: int, seq_len: int) -> dict:
    """LlamaArgs fields of a named size (configs/models/llama_<size>.toml)."""
    from model.llama import size_table
    return {"vocab_size": vocab, "max_seq_len": seq_len, **size_table(model)}


def param_shapes(dims: dict) -> dict[str, tuple[int, ...]]:
    """Parameter name -> shape, from a model built on the meta device (no memory, exact names)."""
    import torch
    from model.llama import Llama, LlamaArgs
    with torch.device("meta"):
        m = Llama(LlamaArgs(**dims))
    return {n: tuple(p.shape) for n, p in m.named_parameters()}


def numel_of(shape) -> int:
    return math.prod(int(s) for s in shape)


# --------------------------------------------------------------------------------------------- activations

def activation_bytes(dims: dict, micro_batch: int, seq_len: int, b: int, attention: str = "flash") -> int:
    """Saved-for-backward bytes of one micro-batch (the formula is in the module docstring). An ESTIMATE."""
    dim, inter, layers, heads, vocab = (dims["dim"], dims["intermediate_size"], dims["n_layers"],
                                        dims["n_heads"], dims["vocab_size"])
    tokens = micro_batch * seq_len
    norm = dim * (4 + 2 * b) + 4                 # fp32 input, normalised (b), output (b), fp32 rsqrt per token
    attn = 4 * b * dim + 4 * heads               # q, k, v, output; fp32 logsumexp per head
    mlp = 4 * b * inter                          # gate, silu(gate), up, product
    per_layer = tokens * (2 * norm + attn + mlp)
    if attention == "math":                      # softmax output saved, no logsumexp
        per_layer += micro_batch * (b * heads * seq_len ** 2 - 4 * heads * seq_len)
    once = tokens * (norm + (4 + b) * vocab)     # final norm; fp32 log-softmax; logits held by train.py
    return layers * per_layer + once


def loss_backward_bytes(vocab: int, micro_batch: int, seq_len: int) -> int:
    """The two fp32 (tokens, vocab) gradients alive at the start of backward (module docstring)."""
    return 2 * 4 * vocab * micro_batch * seq_len


# --------------------------------------------------------------------------------------------- estimate

def estimate(model: str = "llama_1b", optim: str = "rgp8bit", rank: int = 512, world_size: int = 8, zero: int = 2,
             micro_batch: int = 16, seq_len: int = 256, dtype: str = "bf16", vocab: int = 32000,
             attention: str = "flash", proj_type: str = "std", oversampling: int = 2, power_iters: int = 0,
             grad_accum: int = 1, lowrank_update: bool = False, basis_dtype: str = "float32") -> dict:
    """Per-rank memory figures in bytes (see the module docstring); pure apart from reading the size table."""
    if optim not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optim!r}; use one of {', '.join(OPTIMIZERS)}")
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype must be bf16 or fp32, got {dtype!r}")
    if zero not in (0, 1, 2):
        raise ValueError(f"--zero must be 0, 1 or 2 (ownership sharding keeps full weights: no stage 3), got {zero}")
    if grad_accum < 1:
        raise ValueError(f"--grad-accum must be >= 1, got {grad_accum}")
    if basis_dtype not in BASIS_DTYPES:
        raise ValueError(f"--basis-dtype must be one of {', '.join(BASIS_DTYPES)}, got {basis_dtype!r}")
    b = DTYPE_BYTES[dtype]
    cfg = OptimConfig(name=optim, rank=rank, proj_type=proj_type, oversampling=oversampling, power_iters=power_iters,
                      basis_dtype=basis_dtype)
    dims = model_dims(model, vocab, seq_len)
    shapes = param_shapes(dims)
    layout = plan_layout(shapes, world_size, cfg)
    def foreach(n):   # stepped by the multi-tensor fp32 Adam path (optim/adam.py, LowRankAdamW._step_adam_foreach)
        return not optim.endswith("8bit") and not (projects(optim) and is_projected(n, shapes[n]))

    per_rank = []
    for r in range(world_size):
        frac = {n: f for n in shapes if (f := layout.share(n, r)) > 0}
        owned = list(frac)
        part = {n: round(numel_of(shapes[n]) * frac[n]) for n in owned}
        owned_numel = sum(part.values())
        per_rank.append({"rank": r, "params": len(owned), "owned_numel": owned_numel,
                         "optimizer_state": round(sum(state_bytes(n, shapes[n], cfg) * frac[n] for n in owned)),
                         "optimizer_state_basis": round(sum(basis_bytes(n, shapes[n], cfg) * frac[n] for n in owned)),
                         "masters": 4 * owned_numel if dtype == "bf16" else 0,
                         # optim.lowrank_update with bf16 weights: fp32 copies of the projected matrices it does
                         # not own (it updates them itself; owned ones are its masters)
                         "lowrank_update_copies": 4 * sum(numel_of(shapes[n]) for n in shapes if n not in frac
                                                          and projects(optim) and is_projected(n, shapes[n]))
                         if lowrank_update and dtype == "bf16" else 0,
                         "largest_owned": max(part.values(), default=0),
                         # fp32 Adam parameters stepped together by the multi-tensor path (module docstring)
                         "foreach_numel": sum(part[n] for n in owned if foreach(n)),
                         "largest_foreach": max((part[n] for n in owned if foreach(n)), default=0),
                         "largest_per_param": max((part[n] for n in owned if not foreach(n)), default=0)})
    worst = max(per_rank, key=lambda x: (x["optimizer_state"] + x["masters"], -x["rank"]))
    total_numel = sum(numel_of(s) for s in shapes.values())
    owned_grad_b = 4 if dtype == "bf16" else b         # owned grads live on the fp32 masters under bf16
    largest = max(numel_of(s) for s in shapes.values())
    in_transit = min((MAX_INFLIGHT + 1) * GRAD_BUCKET_BYTES, total_numel * b)
    if world_size == 1:                                # no collectives: the optimizer sees the grads in place
        grads_backward = total_numel * b
        grads_step = total_numel * b if dtype != "bf16" else worst["owned_numel"] * owned_grad_b
    elif zero == 2:                                    # reduced bucket by bucket during backward, owners sum in fp32
        grads_backward = worst["owned_numel"] * 4 + largest * b + in_transit
        grads_step = worst["owned_numel"] * 4
    else:                                              # accumulated locally, sent during the last backward
        grads_backward = total_numel * b + worst["owned_numel"] * 4
        grads_step = worst["owned_numel"] * 4
    out = {
        "model": model, "optim": optim, "rank": rank, "world_size": world_size, "zero": zero,
        "micro_batch": micro_batch, "seq_len": seq_len, "grad_accum": grad_accum, "dtype": dtype, "vocab": vocab,
        "attention": attention,
        "params": total_numel, "worst_rank": worst["rank"],
        "weights": total_numel * b,
        "grads_backward": grads_backward,
        "grads_step": grads_step,
        "optimizer_state": worst["optimizer_state"],
        "basis_dtype": basis_dtype,
        "optimizer_state_basis": worst["optimizer_state_basis"],
        "masters": worst["masters"],
        "lowrank_update_copies": worst["lowrank_update_copies"],
        "comm_buffer": min(BUCKET_BYTES, total_numel * 4) if world_size > 1 else 0,
        "activations_estimate": activation_bytes(dims, micro_batch, seq_len, b, attention),
        "loss_backward_temporaries": loss_backward_bytes(vocab, micro_batch, seq_len),
        "logits_held": b * vocab * micro_batch * seq_len,     # part of activations_estimate too
        "step_temporaries": max(4 * min(worst["foreach_numel"], max(FOREACH_CHUNK_NUMEL, worst["largest_foreach"])),
                                3 * 4 * worst["largest_per_param"]),
        "optimizer_state_per_rank": [x["optimizer_state"] for x in per_rank],
        "optimizer_state_total": sum(x["optimizer_state"] for x in per_rank),
    }
    base = out["weights"] + out["optimizer_state"] + out["masters"] + out["lowrank_update_copies"]  # all step long
    start = out["activations_estimate"] + out["loss_backward_temporaries"]
    if grad_accum == 1:
        # grads are None when backward starts and activations go as grads come: the peak is at one end
        backward = base + max(start, out["grads_backward"])
    else:
        # earlier micro-batches' grads are alive through the later backward passes
        backward = base + out["grads_backward"] + start
    # train.py still holds the last micro-batch's logits during the step
    step = base + grads_step + out["comm_buffer"] + out["logits_held"] + out["step_temporaries"]
    out.update({"peak_backward": backward, "peak_step": step, "peak": max(backward, step)})
    return out


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


def table(est: dict) -> str:
    rows = [("weights (full, every rank)", "weights"),
            ("gradients during backward", "grads_backward"),
            (f"gradients during step (ZeRO-{est['zero']})", "grads_step"),
            (f"optimizer state (rank {est['worst_rank']}, max)", "optimizer_state"),
            (f"  of which projection bases ({est['basis_dtype']})", "optimizer_state_basis"),
            ("fp32 master copies (owned)", "masters"),
            ("fp32 copies of projected matrices (lowrank_update)", "lowrank_update_copies"),
            ("gradient bucket (fp32)", "comm_buffer"),
            ("activations (ESTIMATE)", "activations_estimate"),
            ("loss backward temporaries (fp32)", "loss_backward_temporaries"),
            ("optimizer step temporaries (fp32)", "step_temporaries"),
            ("peak, backward phase", "peak_backward"),
            ("peak, optimizer step", "peak_step"),
            ("PEAK per GPU", "peak")]
    head = (f"{est['model']} ({est['params'] / 1e6:.1f}M params, vocab {est['vocab']}), {est['optim']}"
            f"{' rank ' + str(est['rank']) if 'adamw' not in est['optim'] else ''}, world {est['world_size']}, "
            f"ZeRO-{est['zero']}, micro-batch {est['micro_batch']} x {est['seq_len']}, grad accum {est['grad_accum']}, "
            f"{est['dtype']}")
    width = max(len(r[0]) for r in rows)
    lines = [head, "-" * len(head)]
    lines += [f"{label:<{width}}  {human(est[key]):>12}" for label, key in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- measurement

def measured_state_bytes(model: str, optim: str, rank: int, vocab: int, seq_len: int = 64, seed: int = 0,
                         basis_dtype: str = "float32") -> int:
    """Bytes of every state tensor of the real optimizer (optim.build_optimizer) after one step with random
    gradients on a real fp32 model, world size 1."""
    import torch
    import optim as optim_pkg
    from model.llama import Llama, LlamaArgs
    torch.manual_seed(seed)
    net = Llama(LlamaArgs(**model_dims(model, vocab, seq_len)))
    cfg = OptimConfig(name=optim, rank=rank, lr=1e-3, basis_dtype=basis_dtype)   # any lr: sizes do not depend on it
    opt = optim_pkg.build_optimizer(net.named_parameters(), cfg)
    for p in net.parameters():
        # State bytes do not depend on the values; a rank-8 gradient keeps the full SVD of GaLore ~10x faster
        # on this CPU than a full-rank Gaussian one (LAPACK's divide and conquer converges quickly).
        p.grad = (torch.randn(p.shape[0], 8) @ torch.randn(8, p.shape[1]) if p.dim() == 2 else torch.randn_like(p))
    opt.step()
    return tensor_bytes(list(opt.state.values()))


CHECKS = [("tiny", 8192, 32), ("60m", 32000, 128)]


def check(print_fn=print) -> bool:
    """Estimate vs measured optimizer state, world size 1 fp32, every optimizer, tiny and 60m."""
    ok = True
    print_fn(f"{'model':<6} {'optimizer':<11} {'rank':>4} {'estimate':>14} {'measured':>14} {'diff':>8}")
    for model, vocab, rank in CHECKS:
        for name in OPTIMIZERS:
            est = estimate(model=model, optim=name, rank=rank, world_size=1, zero=0, micro_batch=1, seq_len=64,
                           dtype="fp32", vocab=vocab)["optimizer_state"]
            got = measured_state_bytes(model, name, rank, vocab)
            diff = (est - got) / got
            ok &= abs(diff) <= 0.02
            print_fn(f"{model:<6} {name:<11} {rank:>4} {est:>14,d} {got:>14,d} {100 * diff:>7.2f}%")
    return ok


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="llama_1b", help="a size in configs/models: tiny, 60m, 130m, 350m, 1b, 7b")
    ap.add_argument("--optim", default="rgp8bit", choices=OPTIMIZERS)
    ap.add_argument("--rank", type=int, default=512, help="projection rank (galore/rgp)")
    ap.add_argument("--world-size", type=int, default=8)
    ap.add_argument("--zero", type=int, default=2, choices=(0, 1, 2))
    ap.add_argument("--micro-batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--grad-accum", type=int, default=1,
                    help="micro-batches per optimizer step (> 1: their gradients are alive during backward)")
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPE_BYTES))
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--attention", default="flash", choices=("flash", "math"),
                    help="math: no fused SDPA kernel, the attention matrix is materialised")
    ap.add_argument("--proj-type", default="std", choices=("std", "left", "right"))
    ap.add_argument("--basis-dtype", default="float32", choices=BASIS_DTYPES,
                    help="optim.basis_dtype: how the projection bases are stored (galore/rgp)")
    ap.add_argument("--lowrank-update", action="store_true",
                    help="optim.lowrank_update: every rank keeps fp32 copies of the projected matrices (bf16)")
    ap.add_argument("--check", action="store_true", help="compare the state estimate with the real optimizer")
    args = ap.parse_args(argv)
    if args.check:
        return 0 if check() else 1
    try:
        est = estimate(model=args.model, optim=args.optim, rank=args.rank, world_size=args.world_size,
                       zero=args.zero, micro_batch=args.micro_batch, seq_len=args.seq_len, dtype=args.dtype,
                       vocab=args.vocab, attention=args.attention, proj_type=args.proj_type,
                       grad_accum=args.grad_accum, lowrank_update=args.lowrank_update, basis_dtype=args.basis_dtype)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table(est))
    print(json.dumps(est))
    return 0


if __name__ == "__main__":
    sys.exit(main())
