"""optim/comm.py: the ledger counts exactly the collectives the sharded optimizer issues (ring bytes per rank),
and gradients travel in optim.comm_dtype. Counted as rank 0 of a `fake` process group; test_multiprocess
checks that a real 2-rank gloo step issues the same ledger."""
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _dist_common as C  # noqa: E402

from optim.comm import CommLedger, ddp_bytes, ring_bytes, zero2_bytes  # noqa: E402
from optim.sharded import ShardedOptimizer  # noqa: E402


def fake_step_ledger(world, grad_mode, dtype=torch.float32, comm_dtype="auto", optim="rgp"):
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    try:
        model = C.tiny_model(dtype=dtype)
        cfg = C.make_cfg(optim)
        cfg.comm_dtype = comm_dtype
        opt = ShardedOptimizer(list(model.named_parameters()), cfg, grad_mode=grad_mode)
        opt.ledger = CommLedger(world)
        batch = C.global_batch(0)
        model(batch[:, :-1], batch[:, 1:])[1].backward()
        opt.sync_gradients()
        opt.clip_grad_norm_(C.CLIP)
        opt.step()
        opt.remove_hooks()
        return model, opt.ledger, opt.layout
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("optim", ["rgp", "adamw"])
@pytest.mark.parametrize("world", [2, 8])
@pytest.mark.parametrize("grad_mode", ["allreduce", "reduce"])
def test_ledger_counts_what_a_step_sends(world, grad_mode, optim):
    """Gradients: one reduce-scatter of W equal chunks per bucket of slices and rounds (ZeRO-2's bytes: (W-1)/W
    of the payload) plus a reduce (1x) per leftover matrix; weights come back by the all-gather of the same
    layout plus a broadcast per leftover. The payload is the model's size plus the slices' padding to whole
    256-value blocks: nothing else travels."""
    model, ledger, layout = fake_step_ledger(world, grad_mode, optim=optim)
    numel = sum(p.numel() for p in model.parameters())
    n_params = len(list(model.parameters()))
    sliced = sum(layout.numel[n] for n in layout.slice_numel)
    scatter = world * sum(layout.slice_numel.values()) + sum(layout.numel[n] for r in layout.rounds for n in r)
    singles = sum(layout.numel[n] for n in layout.singles)
    assert sliced + sum(layout.numel[n] for r in layout.rounds for n in r) + singles == numel   # each counted once
    assert scatter - (numel - singles) < world * 256 * len(layout.slice_numel)                  # padding only
    t = ledger.totals()["by_tag"]
    assert t["grads"] == pytest.approx(ring_bytes("reduce_scatter", 4 * scatter, world) + 4 * singles)
    assert t["weights"] == pytest.approx(ring_bytes("all_gather", 4 * scatter, world) + 4 * singles)
    assert t["flags"] == pytest.approx(ring_bytes("all_reduce", 4 * n_params, world))   # int32 per parameter
    assert t["norms"] == pytest.approx(ring_bytes("all_reduce", 8 * n_params, world))   # norms, slices' squares
    ops = {r.op for r in ledger.records if r.tag == "grads"}
    assert ops == {"reduce_scatter"} | ({"reduce"} if singles else set())
    if optim == "adamw":                          # nothing is projected: pure ZeRO-2, every parameter sliced
        assert not layout.owner and not singles


def test_bf16_model_sends_bf16_gradients_unless_told_otherwise():
    _, ledger, _ = fake_step_ledger(2, "reduce", dtype=torch.bfloat16)
    assert {r.dtype for r in ledger.records if r.tag == "grads"} == {"bfloat16"}
    _, ledger32, _ = fake_step_ledger(2, "reduce", dtype=torch.bfloat16, comm_dtype="float32")
    assert {r.dtype for r in ledger32.records if r.tag == "grads"} == {"float32"}
    assert ledger32.totals()["by_tag"]["grads"] == pytest.approx(2 * ledger.totals()["by_tag"]["grads"])


def test_reference_formulas():
    # DDP in bf16 at 8 ranks: 2 x 7/8 x 2 bytes per parameter; ZeRO-2: 7/8 x 2 (reduce-scatter) + 7/8 x 2 (gather)
    assert ddp_bytes(1000, 8) == pytest.approx(3500)
    assert zero2_bytes(1000, 8) == pytest.approx(3500)
    assert zero2_bytes(1000, 8, micro_batches=4) == pytest.approx(4 * 1750 + 1750)
    assert ring_bytes("broadcast", 1000, 1) == 0


def test_zero2_peak_gradient_memory_falls_with_the_world_size(tmp_path):
    """Stage 2 reduce-scatters every micro-batch's buckets during backward and frees them, so a rank holds the
    fp32 sums of what it owns (half the parameters: the 60M model's embed_tokens and lm_head are sliced like
    everything else under adamw) plus what is in transit. 60M, fp32, 2 micro-batches, same code at 1 and 2
    ranks: measured 184.8 MB vs 310.5 MB (0.595). The floor is owned sums (116 MB) + one whole table gradient
    (65.5 MB, which autograd materialises at once): tables are reduce-scattered in CHUNK_BYTES chunks so
    little else is ever in transit."""
    import json
    import os
    import subprocess
    from tests.helpers import free_port
    repo = Path(__file__).resolve().parents[2]
    for world in (1, 2):
        proc = subprocess.run(["torchrun", f"--nproc_per_node={world}", f"--master_port={free_port()}",
                               "tests/distributed/worker_grad_memory.py", str(tmp_path)], cwd=repo,
                              env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    one = json.loads((tmp_path / "grad_memory_w1.json").read_text())
    two = json.loads((tmp_path / "grad_memory_w2.json").read_text())
    assert one["peaks"][0] >= one["full_grad_bytes"]               # one rank holds the whole gradient
    assert max(two["peaks"]) <= 0.6 * one["peaks"][0], (two, one)
    from optim.sharded import GRAD_BUCKET_BYTES, MAX_INFLIGHT
    for peak, owned in zip(two["peaks"], two["owned_bytes"]):       # the design's bound, per rank
        assert peak <= owned + two["largest_param_bytes"] + (MAX_INFLIGHT + 1) * GRAD_BUCKET_BYTES, (peak, owned)


def test_a_discarded_wrapper_is_freed_despite_its_gradient_hooks():
    """The backward hooks hold the wrapper weakly: building a second wrapper over the same model (tests, benches,
    a restart in one process) does not keep the first one's fp32 masters alive."""
    import gc
    import weakref
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    try:
        model = C.tiny_model(dtype=torch.bfloat16)
        opt = ShardedOptimizer(list(model.named_parameters()), C.make_cfg("adamw"), grad_mode="reduce")
        assert opt.distributed and opt.masters
        ref = weakref.ref(opt)
        del opt
        gc.collect()
        assert ref() is None
        batch = C.global_batch(0)
        model(batch[:, :-1], batch[:, 1:])[1].backward()      # the orphaned hooks are no-ops
    finally:
        dist.destroy_process_group()


def test_weights_arrive_during_the_next_forward_in_model_order():
    """async_weights + wait_in_forward: step() only starts the all-gathers; each module's forward pre-hook waits
    for the buckets (model order) up to the last one holding its own parameters, so the embedding computes
    before the last buckets land, and the forward ends with every bucket landed."""
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    try:
        import optim.sharded as sharded
        model = C.tiny_model()
        old = sharded.BUCKET_BYTES
        sharded.BUCKET_BYTES = 64 * 64 * 4 * 2          # small buckets: several of them for the tiny model
        try:
            opt = ShardedOptimizer(list(model.named_parameters()), C.make_cfg("rgp"), grad_mode="reduce")
        finally:
            sharded.BUCKET_BYTES = old
        assert len(opt._weight_buckets) > 3
        opt.async_weights = True
        opt.wait_in_forward(model)
        waits = []
        real = opt.wait_for_weights
        opt.wait_for_weights = lambda upto=None: (waits.append(upto), real(upto))[1]
        batch = C.global_batch(0)
        model(batch[:, :-1], batch[:, 1:])[1].backward()
        opt.sync_gradients()
        opt.clip_grad_norm_(0.0)
        waits.clear()
        opt.step()
        assert len(opt._weights_inflight) == len(opt._weight_buckets)     # started, none waited
        model(batch[:, :-1], batch[:, 1:])
        assert not opt._weights_inflight
        forward_waits = [w for w in waits if w is not None]
        # the first module waits for the first buckets only; by the end every bucket has been waited for
        assert forward_waits[0] < len(opt._weight_buckets) - 1 == max(forward_waits)
        opt.remove_hooks()
    finally:
        dist.destroy_process_group()
