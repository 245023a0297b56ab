"""Single-process tests of the layout (optim/ownership.py) and of the world-size-1 pass-through."""
import importlib
import math
import random
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _dist_common as C  # noqa: E402

from config import OptimConfig  # noqa: E402
from model.llama import build_model  # noqa: E402
from optim import build_optimizer  # noqa: E402
from optim.deepspeed_glue import DeepSpeedConfigError, read_deepspeed_config  # noqa: E402
from optim.adam import is_projected, projects  # noqa: E402
from optim.ownership import SLICE_ALIGN, param_cost, plan_layout, plan_ownership, plan_summary  # noqa: E402
from optim.sharded import (ShardedOptimizer, load_optimizer_shards,  # noqa: E402
                           save_optimizer_shards, tensor_bytes)


def shapes_of(size: str, vocab: int = 32000) -> dict:
    with torch.device("meta"):
        model = build_model(size, vocab, 256)
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


def test_plan_is_deterministic_and_order_free():
    shapes = shapes_of("60m")
    cfg = C.make_cfg("galore")
    plan = plan_ownership(shapes, 4, cfg)
    items = list(shapes.items())
    random.Random(0).shuffle(items)
    assert plan_ownership(dict(items), 4, cfg) == plan
    assert plan_ownership(shapes, 4, cfg) == plan
    assert set(plan) == set(shapes) and set(plan.values()) == {0, 1, 2, 3}


@pytest.mark.parametrize("name", ["adamw", "galore", "rgp8bit"])
@pytest.mark.parametrize("size,world", [("60m", 2), ("60m", 4), ("1b", 8)])
def test_plan_balances_state(name, size, world):
    shapes = shapes_of(size)
    cfg = C.make_cfg(name)
    cfg.rank = 128 if size == "60m" else 512
    s = plan_summary(plan_ownership(shapes, world, cfg), shapes, cfg, world)
    # no plan beats the largest single item (60M's embedding is over a quarter of AdamW's state)
    largest = max(param_cost(n, sh, cfg)[1] for n, sh in shapes.items())
    floor = largest / (sum(s["state_bytes"]) / world)
    assert s["state_imbalance"] <= max(1.10, floor * 1.001), s


@pytest.mark.parametrize("name", ["adamw", "rgp", "galore8bit"])
@pytest.mark.parametrize("size,world", [("60m", 2), ("60m", 8), ("60m", 64), ("1b", 8), ("1b", 3)])
def test_layout_rounds_and_slices(name, size, world):
    """Every parameter is exactly one of: in a round, a leftover single, or sliced; a round holds W matrices of
    one size in backward order, rank j owning the j-th; slices are 256-aligned and cover each sliced tensor
    exactly once; non-projected optimizers slice everything (ZeRO-2)."""
    shapes = shapes_of(size)
    cfg = C.make_cfg(name)
    cfg.rank = 128 if size == "60m" else 512
    layout = plan_layout(shapes, world, cfg)
    numel = {n: math.prod(s) for n, s in shapes.items()}
    in_rounds = [n for r in layout.rounds for n in r]
    assert sorted(in_rounds + layout.singles + list(layout.slice_numel)) == sorted(shapes)
    projected = {n for n in shapes if projects(name) and is_projected(n, shapes[n])}
    assert set(in_rounds) | set(layout.singles) == projected == set(layout.owner)
    order = list(shapes)
    for r in layout.rounds:
        assert len(r) == world and len({numel[n] for n in r}) == 1
        assert [order.index(n) for n in r] == sorted((order.index(n) for n in r), reverse=True)
        assert [layout.owner[n] for n in r] == list(range(world))
    sizes = {}
    for n in layout.singles:                     # fewer than W leftovers of any size
        sizes[numel[n]] = sizes.get(numel[n], 0) + 1
    assert all(k < world for k in sizes.values())
    for n, s in layout.slice_numel.items():
        assert s % SLICE_ALIGN == 0 and s * world >= numel[n] > s * (world - 1) - SLICE_ALIGN * world
        ranges = [layout.slice_range(n, j) for j in range(world)]
        assert ranges[0][0] == 0 and ranges[-1][1] == numel[n]
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    if not projects(name):
        assert not layout.owner
    assert plan_layout(shapes, world, cfg) == layout                  # deterministic
    one = plan_layout(shapes, 1, cfg)
    assert one.owner == {n: 0 for n in shapes} and not one.slice_numel   # one process: everything whole


def test_layout_balances_bytes_and_state_at_8_ranks():
    """1B, rgp rank 512, 8 ranks: every round gives each rank one matrix, slices are equal, so every rank sends
    and stores the same (up to the slices' padding)."""
    shapes = shapes_of("1b")
    cfg = C.make_cfg("rgp")
    cfg.rank = 512
    layout = plan_layout(shapes, 8, cfg)
    assert not layout.singles
    load = [0] * 8
    for n in shapes:
        for j in range(8):
            if layout.owns(n, j):
                a, b = layout.slice_range(n, j) if n in layout.slice_numel else (0, math.prod(shapes[n]))
                load[j] += b - a
    assert max(load) / (sum(load) / 8) < 1.001


@pytest.mark.parametrize("saved_world,world", [(3, 2), (2, 5), (1, 4), (4, 1)])
def test_sliced_state_is_recut_exactly_for_another_world_size(saved_world, world):
    """A sliced parameter's state saved as W1 pieces (per-element values and per-256-block absmax) is cut for
    W2 ranks value for value, as slicing the whole tensor would cut it."""
    from optim.sharded import _cut
    n = 5000
    whole = torch.randn(n)
    absmax = torch.randn(math.ceil(n / 256))

    def ranges(w):
        s = SLICE_ALIGN * math.ceil(n / (w * SLICE_ALIGN))
        return [(min(j * s, n), min((j + 1) * s, n)) for j in range(w) if j * s < n]
    values = [(a, b, whole[a:b].clone()) for a, b in ranges(saved_world)]
    blocks = [(a, b, absmax[a // 256:math.ceil(b / 256)].clone()) for a, b in ranges(saved_world)]
    for a, b in ranges(world):
        assert torch.equal(_cut(values, a, b, (b - a,)), whole[a:b])
        assert torch.equal(_cut(blocks, a, b, (b - a,)), absmax[a // 256:math.ceil(b / 256)])
    with pytest.raises(ValueError, match="do not cover"):
        _cut(values[1:], 0, n, (n,))


def test_a_broken_optim_fails_the_tests_instead_of_a_stand_in(monkeypatch):
    """The shared test code uses optim itself: an optim that does not import must fail these tests, not be
    replaced by a torch AdamW stand-in under which they would pass."""
    monkeypatch.setitem(sys.modules, "optim", None)          # `import optim` now raises ImportError
    monkeypatch.delitem(sys.modules, "_dist_common")         # restored after the test
    with pytest.raises(ImportError):
        importlib.import_module("_dist_common")


# Names and shapes that take every path of the state layout at rank 8: the embedding and lm_head (6400 values) get
# 8-bit moments under the 8-bit optimizers and the norm (64) fp32 ones; q_proj has 8192 values but its projected
# moments only 512 or 1024 (fp32 even under 8-bit), up_proj's are 5120 (8-bit) on the right and 768 on the left.
STATE_SHAPES = {"embed_tokens.weight": (100, 64), "norm.weight": (64,), "layers.0.attn.q_proj.weight": (64, 128),
                "layers.0.mlp.up_proj.weight": (640, 96), "lm_head.weight": (100, 64)}


@pytest.mark.parametrize("proj_type", ["std", "left", "right"])
@pytest.mark.parametrize("name", C.ALL_NAMES)
def test_plan_state_bytes_are_the_optimizers_state_bytes(name, proj_type):
    """The ownership plan balances the state the optimizer really allocates, parameter by parameter."""
    cfg = OptimConfig(name=name, lr=1e-3, rank=8, proj_type=proj_type)
    torch.manual_seed(0)
    params = {n: torch.nn.Parameter(torch.randn(shape)) for n, shape in STATE_SHAPES.items()}
    opt = build_optimizer(list(params.items()), cfg)
    for p in params.values():
        p.grad = torch.randn_like(p)
    opt.step()
    for n, p in params.items():
        assert param_cost(n, p.shape, cfg)[1] == tensor_bytes(opt.state[p]), n


def test_world_larger_than_params_is_refused():
    shapes = {"a": (4, 4), "b": (4,)}
    with pytest.raises(ValueError, match="at most 2"):
        plan_ownership(shapes, 3, C.make_cfg("adamw"))


@pytest.mark.parametrize("name", C.ALL_NAMES)
def test_world_size_one_is_the_bare_optimizer(name):
    cfg = C.make_cfg(name)
    m1, m2 = C.tiny_model(), C.tiny_model()
    opt = ShardedOptimizer(list(m1.named_parameters()), cfg)
    ref = build_optimizer(list(m2.named_parameters()), cfg)
    assert opt.world_size == 1 and not opt.distributed and len(opt.owned) == len(list(m1.parameters()))
    for step in range(C.STEPS):
        batch = C.global_batch(step)
        for model in (m1, m2):
            model(batch[:, :-1], batch[:, 1:])[1].backward()
        opt.sync_gradients()
        n1 = opt.clip_grad_norm_(C.CLIP)
        n2 = torch.nn.utils.clip_grad_norm_(m2.parameters(), C.CLIP)
        assert torch.equal(n1, n2)
        for g in opt.param_groups:
            g["lr"] = 0.01 * (step + 1) / C.STEPS
        for g in ref.param_groups:
            g["lr"] = 0.01 * (step + 1) / C.STEPS
        opt.step(); ref.step(); opt.zero_grad(); ref.zero_grad()
    for (n, a), b in zip(m1.named_parameters(), m2.parameters()):
        assert torch.equal(a, b), n


def test_state_dict_by_name_roundtrip(tmp_path):
    cfg = C.make_cfg("galore")
    model = C.tiny_model()
    opt = ShardedOptimizer(list(model.named_parameters()), cfg)
    C.train(model, opt, 0, 3)
    sd = opt.state_dict()
    assert set(sd["state"]) <= {n for n, _ in model.named_parameters()} and sd["world_size"] == 1
    torch.save(sd, tmp_path / "o.pt")
    sd2 = torch.load(tmp_path / "o.pt", weights_only=True)
    assert opt.state_bytes() > 0
    save_optimizer_shards(opt, tmp_path / "ck")
    m2 = C.tiny_model(seed=5)
    m2.load_state_dict(model.state_dict())
    opt2 = ShardedOptimizer(list(m2.named_parameters()), cfg)
    opt2.load_state_dict(sd2)
    opt3 = ShardedOptimizer(list(m2.named_parameters()), cfg)
    load_optimizer_shards(opt3, tmp_path / "ck")
    for a, b in ((opt.state_dict(), opt2.state_dict()), (opt.state_dict(), opt3.state_dict())):
        for n, st in a["state"].items():
            for k, v in st.items():
                assert torch.equal(v, b["state"][n][k]) if torch.is_tensor(v) else v == b["state"][n][k]


def test_bf16_single_process_keeps_fp32_masters():
    model = C.tiny_model(dtype=torch.bfloat16)
    opt = ShardedOptimizer(list(model.named_parameters()), C.make_cfg("adamw"))
    C.train(model, opt, 0, 1)
    assert set(opt.masters) == {n for n, _ in model.named_parameters()}
    assert all(m.dtype == torch.float32 for m in opt.masters.values())
    assert all(p.dtype == torch.bfloat16 and torch.equal(p, opt.masters[n].bfloat16())
               for n, p in model.named_parameters())


def test_deepspeed_settings_and_refusals(tmp_path):
    ds = read_deepspeed_config(C.REPO / "configs/deepspeed/zero2.json", 2)
    assert ds.grad_mode == "reduce" and ds.zero_stage == 2 and ds.bf16 is True      # GPU recipes train in bf16
    assert ds.micro_batch is ds.grad_accum is ds.grad_clip is None                   # the run config sets them
    assert read_deepspeed_config(C.REPO / "configs/deepspeed/zero2_cpu.json").bf16 is False
    patched = ds.engine_config
    assert patched["zero_optimization"] == {"stage": 0} and patched["gradient_clipping"] == 0.0
    assert "bf16" not in patched and patched["managed_gradient_accumulation"] is False
    assert read_deepspeed_config(C.REPO / "configs/deepspeed/zero1.json").grad_mode == "allreduce"
    with pytest.raises(DeepSpeedConfigError, match="stage 3"):
        read_deepspeed_config(C.REPO / "configs/deepspeed/zero3.json")
    base = {"train_micro_batch_size_per_gpu": 1}
    for bad, msg in [({"fp16": {"enabled": True}}, "fp16"),
                     ({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}, "offload"),
                     ({"optimizer": {"type": "Adam"}}, "optimizer"),
                     ({"train_batch_size": 3, "gradient_accumulation_steps": 1}, "train_batch_size"),
                     ({"gradient_accumulation_steps": 0}, "gradient_accumulation_steps must be")]:
        with pytest.raises(DeepSpeedConfigError, match=msg):
            read_deepspeed_config({**base, **bad}, 2)


def test_deepspeed_batch_settings_come_from_the_run():
    from config import TrainConfig
    from optim.deepspeed_glue import reconcile_with_run
    t = TrainConfig(micro_batch=4, grad_accum=2, grad_clip=0.5, dtype="auto")
    ds = read_deepspeed_config({"zero_optimization": {"stage": 2}, "bf16": {"enabled": True}}, 2)
    assert reconcile_with_run(ds, t, 2) == "bfloat16"
    assert (ds.micro_batch, ds.grad_accum, ds.grad_clip) == (4, 2, 0.5)
    assert ds.engine_config["train_micro_batch_size_per_gpu"] == 4
    assert ds.engine_config["gradient_accumulation_steps"] == 2          # what engine.backward divides by
    same = read_deepspeed_config({"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2,
                                  "train_batch_size": 16, "gradient_clipping": 0.5}, 2)
    assert reconcile_with_run(same, t, 2) == "auto"                       # restating the run's values is fine
    for conf, msg in [({"gradient_accumulation_steps": 1}, "gradient_accumulation_steps=1 but the run has "
                       "train.grad_accum=2"),
                      ({"train_micro_batch_size_per_gpu": 8}, "train.micro_batch=4"),
                      ({"gradient_clipping": 1.0}, "train.grad_clip=0.5"),
                      ({"train_batch_size": 8}, "train_batch_size=8")]:
        with pytest.raises(DeepSpeedConfigError, match=msg):
            reconcile_with_run(read_deepspeed_config(conf, 2), t, 2)
    assert read_deepspeed_config({"communication_data_type": "bf16"}, 2).comm_dtype == "bfloat16"
    assert read_deepspeed_config({}, 2).comm_dtype is None
    with pytest.raises(DeepSpeedConfigError, match="communication_data_type 'fp16' is not supported"):
        read_deepspeed_config({"communication_data_type": "fp16"}, 2)
    t.dtype = "float32"
    with pytest.raises(DeepSpeedConfigError, match="bf16.enabled=true but the run has train.dtype=float32"):
        reconcile_with_run(read_deepspeed_config({"bf16": {"enabled": True}}, 2), t, 2)


def test_rank_disagreement_names_the_difference():
    from optim.ownership import describe_disagreement, run_signature
    model = C.tiny_model()
    named = list(model.named_parameters())
    a = run_signature(named, C.make_cfg("galore"), 2, "reduce")
    cfg = C.make_cfg("galore")
    cfg.rank = 16
    assert describe_disagreement([a, run_signature(named, cfg, 2, "reduce")]) == (
        "ranks disagree: rank 1 has optim.rank=16, rank 0 has optim.rank=8; launch every rank with the same config")
    bigger = list(C.tiny_model(dtype=torch.bfloat16).named_parameters())
    assert "parameter 0 is ['embed_tokens.weight', [256, 64], 'bfloat16'] on rank 1" in describe_disagreement(
        [a, run_signature(bigger, C.make_cfg("galore"), 2, "reduce")])
    assert "grad_mode=allreduce" in describe_disagreement([a, a, run_signature(named, C.make_cfg("galore"), 2,
                                                                                 "allreduce")])
