"""GPU-only bugs, caught on a CPU: every tensor the sharded optimizer hands to a collective lives on the
communication device (the parameters' device), and nothing it creates depends on the default device.

NCCL refuses CPU tensors, and on a mixed `cpu:gloo,cuda:nccl` group a buffer created on the CPU by one rank
and on the GPU by another meets on different backends and hangs. gloo on a CPU accepts anything, so the
tests here make the difference visible (docs/design.md, "Testing GPU code on a CPU"):
- the optimizer's sync / clip / step run under `torch.device("meta")`: a tensor created without an explicit
  device lands on `meta`, where `.tolist()`, a copy or the arithmetic with real tensors fails loudly (it is
  also what a user's `torch.set_default_device("cuda")` does to such code);
- the `fake` process group lets one process be any rank of a 2-rank job (collectives are no-ops), and a
  recorder around the collectives checks the device of every tensor they receive.
"""
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _dist_common as C  # noqa: E402

from optim.sharded import ShardedOptimizer  # noqa: E402

COLLECTIVES = ("all_reduce", "reduce", "broadcast", "all_gather_single", "reduce_scatter_single", "all_gather_object")


@pytest.fixture
def fake_group(monkeypatch):
    """A 2-rank fake process group (rank chosen by the test) and the list of (collective, device) it saw."""
    seen = []

    def start(rank, world=2):
        dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
        return seen

    for name in COLLECTIVES:
        real = getattr(dist, name)

        def recorder(*args, _real=real, _name=name, **kwargs):
            for a in list(args) + list(kwargs.values()):
                if torch.is_tensor(a):
                    seen.append((_name, a.device))
            work = _real(*args, **kwargs)
            # the fake group sends nothing: no uninitialised memory into weights (as if every rank sent ours)
            if _name == "broadcast" and kwargs.get("src", args[1] if len(args) > 1 else None) != dist.get_rank():
                args[0].zero_()
            elif _name == "all_gather_single":
                args[0].copy_(args[1].repeat(dist.get_world_size()))
            elif _name == "reduce_scatter_single":
                args[0].copy_(args[1].view(dist.get_world_size(), -1)[dist.get_rank()])
            return work
        monkeypatch.setattr(dist, name, recorder)
    yield start
    if dist.is_initialized():
        dist.destroy_process_group()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("mode", ["allreduce", "reduce"])
@pytest.mark.parametrize("name", C.ALL_NAMES)
@pytest.mark.parametrize("rank", [0, 1])
def test_collectives_and_step_never_use_the_default_device(fake_group, rank, name, mode, dtype):
    seen = fake_group(rank)
    model = C.tiny_model(dtype=dtype)
    cfg = C.make_cfg(name)                     # update_proj_gap=2: steps 0 and 2 refresh the bases
    opt = ShardedOptimizer(list(model.named_parameters()), cfg, grad_mode=mode)
    assert opt.distributed and opt.world_size == 2 and opt.device == torch.device("cpu")
    before = {n: p.detach().clone() for n, p in opt.owned}
    for step in range(3):
        batch = C.global_batch(step)
        with torch.device("meta"):             # anything created without a device= lands here and fails
            model(batch[:, :-1], batch[:, 1:])[1].backward()   # (the gradient buckets start in backward hooks)
            opt.sync_gradients()
            norm = opt.clip_grad_norm_(C.CLIP)
            opt.step()
            opt.zero_grad()
        assert norm.device == opt.device and torch.isfinite(norm)
    assert seen and all(dev == opt.device for _, dev in seen), sorted({(c, str(d)) for c, d in seen})
    assert {c for c, _ in seen} >= {"all_reduce", "reduce_scatter_single", "all_gather_single"}
    moved = [n for n, p in opt.owned if not torch.equal(p, before[n])]
    assert len(moved) == len(opt.owned), "every owned parameter is updated"
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_randomized_sketch_ignores_the_default_device():
    from optim.projection import sketch_matrix
    ref = sketch_matrix(6, 3, "w", 4)
    with torch.device("meta"):
        got = sketch_matrix(6, 3, "w", 4)
    assert got.device == torch.device("cpu") and torch.equal(got, ref)


def test_parameters_on_two_devices_are_refused():
    model = C.tiny_model()
    model.norm.weight = torch.nn.Parameter(torch.ones(64, device="meta"))
    with pytest.raises(ValueError, match="several devices"):
        ShardedOptimizer(list(model.named_parameters()), C.make_cfg("adamw"))
