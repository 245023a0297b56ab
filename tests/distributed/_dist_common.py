"""Shared by the distributed tests and their worker scripts: a tiny LLaMA, a deterministic global batch,
and one training loop used identically by 1 process, N torchrun processes and N DeepSpeed processes."""
from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from config import OptimConfig  # noqa: E402
from model.llama import build_model  # noqa: E402
from optim import OPTIMIZERS  # noqa: E402
from optim.adam import projects  # noqa: E402

ALL_NAMES = OPTIMIZERS            # every optimizer the tests run: optim's own registry
PROJECTED_NAMES = [n for n in ALL_NAMES if projects(n)]   # the ones low-rank communication applies to
VOCAB, SEQ, GLOBAL_BATCH, STEPS, CLIP = 256, 32, 4, 6, 0.5


def tiny_model(seed: int = 0, dtype=torch.float32):
    torch.manual_seed(seed)
    return build_model("tiny", VOCAB, SEQ, dim=64, n_layers=2, n_heads=2, intermediate_size=128).to(dtype)


def make_cfg(name: str) -> OptimConfig:
    return OptimConfig(name=name, lr=0.01, rank=8, update_proj_gap=2, weight_decay=0.01)


def global_batch(step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=g)


def train(model, opt, start: int, stop: int, rank: int = 0, world: int = 1, identical: bool = False,
          accum: int = 1, engine=None, clip: float = CLIP, explicit_sync: bool = True):
    """Optimizer steps start..stop-1. Rank r takes its 1/world of the global batch (all of it if identical).
    With a DeepSpeed engine: engine.backward per micro-batch, then (explicit_sync) sync + clip, then one
    engine.step() per optimizer step, as train.py does; explicit_sync=False leaves sync + clip to step()."""
    for step in range(start, stop):
        batch = global_batch(step)
        if not identical:
            batch = batch.chunk(world)[rank]
        for mb in batch.chunk(accum):
            if engine is not None:
                loss = engine(mb[:, :-1], mb[:, 1:])[1]
                engine.backward(loss)
            else:
                loss = model(mb[:, :-1], mb[:, 1:])[1]
                (loss / accum).backward()
        if engine is None or explicit_sync:
            opt.sync_gradients()
            opt.clip_grad_norm_(clip)
        if engine is None:
            opt.step()
        else:
            engine.step()
        opt.zero_grad()


def weights(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def ranks_agree(model) -> bool:
    """Every rank holds bit-identical weights (compared against rank 0's)."""
    import torch.distributed as dist
    flat = torch.cat([p.detach().float().reshape(-1) for p in model.parameters()])
    ref = flat.clone()
    dist.broadcast(ref, src=0)
    ok = torch.tensor([int(torch.equal(ref, flat))])
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item())
