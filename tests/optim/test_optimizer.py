"""build_optimizer: groups, subsets, state save/restore, 8-bit state size, non-finite gradients, bad input."""
from __future__ import annotations


import pytest
import torch
import torch.nn as nn

from config import OptimConfig
from model import build_model
from optim import OPTIMIZERS, build_optimizer


def _model(seed=0):
    torch.manual_seed(seed)
    return build_model("tiny", 256, 16, dim=64, n_layers=2, n_heads=2, intermediate_size=96)


def _batch(step):
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randint(0, 256, (2, 16), generator=g)
    return x, x


def _train(model, opt, steps, start=0):
    for t in range(start, start + steps):
        x, y = _batch(t)
        _, loss = model(x, y)
        loss.backward()
        for group in opt.param_groups:
            group["lr"] = group.get("base_lr", 1e-2) * (0.5 + 0.5 * (t % 3))   # as train.py: base lr x schedule
        opt.step()
        opt.zero_grad(set_to_none=True)


def _cfg(name, **kw):
    kw.setdefault("rank", 8)
    kw.setdefault("update_proj_gap", 2)
    kw.setdefault("weight_decay", 0.01)
    return OptimConfig(name=name, lr=1e-2, **kw)


def test_groups_carry_names_and_projection_rule():
    model = _model()
    opt = build_optimizer(model, _cfg("galore"))
    low, adam = opt.param_groups
    assert low["kind"] == "lowrank" and adam["kind"] == "adam"
    for g in opt.param_groups:
        assert len(g["names"]) == len(g["params"])
    assert all(("self_attn" in n or "mlp" in n) and n.endswith("weight") for n in low["names"])
    assert len(low["names"]) == 2 * 7
    assert "embed_tokens.weight" in adam["names"] and "lm_head.weight" in adam["names"]
    assert "norm.weight" in adam["names"]
    one = build_optimizer(model, _cfg("adamw"))         # the same two groups, so lrs can be set per kind
    assert [g["names"] for g in one.param_groups] == [low["names"], adam["names"]]


def test_matrix_and_other_learning_rates_apply_to_every_optimizer():
    """optim.matrix_lr / other_lr: an AdamW with other_lr = 0 moves no embedding, norm or lm_head, and its
    matrices move exactly as in an AdamW over the matrices alone; the same split holds for GaLore."""
    for name in ("adamw", "galore", "rgp8bit"):
        model, ref = _model(), _model()
        cfg = _cfg(name)
        cfg.other_lr, cfg.matrix_lr = 1e-30, 2e-3       # effectively frozen vs a real lr
        opt = build_optimizer(model, cfg)
        assert [g["base_lr"] for g in opt.param_groups] == [2e-3, 1e-30]
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        _train(model, opt, 2)
        for n, p in model.named_parameters():
            moved = (p - before[n]).abs().max().item()
            if n in opt.param_groups[1]["names"]:
                assert moved < 1e-20, (name, n, moved)
            else:
                assert moved > 1e-6, (name, n)
    model, ref = _model(), _model()
    cfg = _cfg("adamw")
    cfg.matrix_lr = 3e-3
    opt = build_optimizer(model, cfg)
    matrices = [(n, p) for n, p in ref.named_parameters() if n in opt.param_groups[0]["names"]]
    ref_cfg = _cfg("adamw")
    ref_cfg.lr = 3e-3
    ref_opt = build_optimizer(matrices, ref_cfg)
    _train(model, opt, 1)          # one step: after it the embeddings (trained only in `model`) differ
    _train(ref, ref_opt, 1)
    for n, p in matrices:
        assert torch.equal(dict(model.named_parameters())[n], p), n


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_save_restore_continues_bit_identically(name, tmp_path):
    k = 3
    ref_model = _model()
    ref_opt = build_optimizer(ref_model, _cfg(name))
    _train(ref_model, ref_opt, 2 * k)

    model = _model()
    opt = build_optimizer(model, _cfg(name))
    _train(model, opt, k)
    path = tmp_path / "opt.pt"
    torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, path)
    blob = torch.load(path, weights_only=True)

    model2 = _model(seed=99)
    model2.load_state_dict(blob["model"])
    opt2 = build_optimizer(model2, _cfg(name))
    opt2.load_state_dict(blob["optim"])
    _train(model2, opt2, k, start=k)
    for (n, a), (_, b) in zip(ref_model.named_parameters(), model2.named_parameters()):
        assert torch.equal(a, b), n
    # projected params' bases are saved as tensors
    if name not in ("adamw", "adamw8bit"):
        st = blob["optim"]["state"]
        assert any("basis" in s and torch.is_tensor(s["basis"]) for s in st.values())


def test_state_dict_is_plain_tensors_and_numbers():
    model = _model()
    opt = build_optimizer(model, _cfg("rgp8bit", rank=16))
    _train(model, opt, 2)
    for st in opt.state_dict()["state"].values():
        for v in st.values():
            assert torch.is_tensor(v) or isinstance(v, (int, float))


def test_loading_another_optimizers_state_is_a_value_error():
    model = _model()
    a = build_optimizer(model, _cfg("adamw"))
    _train(model, a, 1)
    g = build_optimizer(model, _cfg("galore"))
    with pytest.raises(ValueError, match="does not match|param groups"):
        g.load_state_dict(a.state_dict())
    _train(model, g, 1)
    g16 = build_optimizer(model, _cfg("galore", rank=16))
    with pytest.raises(ValueError, match="rank"):
        g16.load_state_dict(g.state_dict())
    g8 = build_optimizer(model, _cfg("galore8bit"))
    with pytest.raises(ValueError, match="does not match"):
        g8.load_state_dict(g.state_dict())
    sub = build_optimizer([(n, p) for n, p in model.named_parameters() if "layers.0" in n], _cfg("galore"))
    with pytest.raises(ValueError, match="names"):
        sub.load_state_dict(g.state_dict())


@pytest.mark.parametrize("name", ["galore", "rgp8bit", "adamw"])
def test_subsets_update_like_the_whole(name):
    """Each parameter's update depends only on its own gradient and state: optimizers over disjoint subsets
    (one with no projected params, one with no Adam-only params, one empty) give the same weights as one
    optimizer over everything."""
    whole = _model()
    opt = build_optimizer(whole, _cfg(name))
    _train(whole, opt, 3)

    parts = _model()
    named = list(parts.named_parameters())
    proj = [(n, p) for n, p in named if p.ndim == 2 and "embed" not in n and "lm_head" not in n]
    rest = [(n, p) for n, p in named if (n, p) not in proj]
    opts = [build_optimizer(proj, _cfg(name)), build_optimizer(rest, _cfg(name)), build_optimizer([], _cfg(name))]
    for t in range(3):
        x, y = _batch(t)
        _, loss = parts(x, y)
        loss.backward()
        for o in opts:
            for group in o.param_groups:
                group["lr"] = 1e-2 * (0.5 + 0.5 * (t % 3))
            o.step()
            o.zero_grad(set_to_none=True)
    for (n, a), (_, b) in zip(whole.named_parameters(), parts.named_parameters()):
        assert torch.equal(a, b), n


def test_8bit_lowrank_moments_are_a_quarter_of_fp32():
    p32 = nn.Parameter(torch.randn(512, 256) * 0.02)
    p8 = nn.Parameter(p32.detach().clone())
    o32 = build_optimizer([("layers.0.mlp.up_proj.weight", p32)], _cfg("galore", rank=64))
    o8 = build_optimizer([("layers.0.mlp.up_proj.weight", p8)], _cfg("galore8bit", rank=64))
    g = torch.randn(512, 256)
    for p, o in ((p32, o32), (p8, o8)):
        p.grad = g.clone()
        o.step()

    def moment_bytes(st):
        return sum(v.numel() * v.element_size() for k, v in st.items() if torch.is_tensor(v) and k != "basis")

    b32, b8 = moment_bytes(o32.state[p32]), moment_bytes(o8.state[p8])
    assert o8.state[p8]["state1"].shape == (512, 64) and o8.state[p8]["state1"].dtype == torch.uint8
    assert 0.24 < b8 / b32 < 0.27, (b8, b32)          # 1 byte per value + one fp32 absmax per 256 values
    # and the 8-bit update stays close to the fp32 one
    torch.testing.assert_close(p8.data, p32.data, atol=2e-3, rtol=0)


@pytest.mark.parametrize("name", ["galore", "rgp"])
def test_nonfinite_gradient_never_reaches_svd(name):
    p = nn.Parameter(torch.randn(24, 16) * 0.1)
    opt = build_optimizer([("layers.0.self_attn.q_proj.weight", p)], _cfg(name, rank=4, update_proj_gap=2))
    before = p.detach().clone()
    bad = torch.randn(24, 16)
    bad[3, 4] = float("nan")
    p.grad = bad
    with pytest.warns(UserWarning, match="non-finite"):
        opt.step()                                    # no basis yet: update skipped
    assert torch.equal(p, before) and "basis" not in opt.state[p]
    p.grad = torch.randn(24, 16)
    opt.step()                                        # builds the basis at step 0
    basis = opt.state[p]["basis"].clone()
    assert opt.state[p]["step"] == 1
    p.grad = torch.randn(24, 16)
    opt.step()                                        # step 1: no refresh
    p.grad = torch.full((24, 16), float("inf"))
    with pytest.warns(UserWarning, match="old basis kept"):
        opt.step()                                    # step 2: refresh due, skipped, basis kept
    assert torch.equal(opt.state[p]["basis"], basis)


def test_moments_on_refresh_project_runs_and_differs_from_keep():
    out = {}
    for mode in ("keep", "project"):
        model = _model()
        opt = build_optimizer(model, _cfg("galore8bit", moments_on_refresh=mode, rank=16))
        _train(model, opt, 4)
        out[mode] = [p.detach().clone() for p in model.parameters()]
        assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(out["keep"], out["project"]))


def test_bad_input_errors_are_one_line():
    model = _model()
    cases = [
        (_cfg("galore", rank=65), "exceeds min"),         # tiny model: dim 64
        (_cfg("rgp", rank=0), "optim.rank"),
        (_cfg("galore", update_proj_gap=0), "update_proj_gap"),
        (OptimConfig(name="adam"), "adamw, adamw8bit, galore, galore8bit, rgp, rgp8bit"),
        (_cfg("galore", proj_type="diag"), "proj_type"),
        (_cfg("rgp", oversampling=-1), "oversampling"),
    ]
    for cfg, match in cases:
        with pytest.raises(ValueError, match=match) as info:
            build_optimizer(model, cfg)
        assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="not an optimizer state"):
        build_optimizer(model, _cfg("adamw")).load_state_dict({"foo": 1})
    # adamw ignores the projection knobs
    build_optimizer(model, _cfg("adamw", rank=0, update_proj_gap=0))


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_bf16_parameters_step(name):
    p = nn.Parameter((torch.randn(64, 96) * 0.1).bfloat16())
    e = nn.Parameter(torch.randn(5000).bfloat16())
    opt = build_optimizer([("layers.0.mlp.up_proj.weight", p), ("embed_tokens.weight", e)], _cfg(name, rank=8))
    before = p.detach().clone()
    for _ in range(2):
        p.grad = torch.randn(64, 96).bfloat16()
        e.grad = torch.randn(5000).bfloat16()
        opt.step()
    assert p.dtype == torch.bfloat16 and torch.isfinite(p.float()).all() and not torch.equal(p, before)
