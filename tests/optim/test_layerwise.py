"""Layer-wise mode: same weights as the normal optimizer step, with gradient accumulation; grads are freed."""
from __future__ import annotations

import pytest
import torch

from config import OptimConfig
from model import build_model
from optim import build_optimizer
from optim.layerwise import LayerwiseStepper


def _model():
    torch.manual_seed(0)
    return build_model("tiny", 256, 16, dim=64, n_layers=2, n_heads=2, intermediate_size=96)


def _micro(step, micro):
    g = torch.Generator().manual_seed(10 * step + micro)
    x = torch.randint(0, 256, (2, 16), generator=g)
    return x, x


def _lr(step):
    return 1e-2 * min(1.0, (step + 1) / 2)             # a warmup: the lr changes every step


@pytest.mark.parametrize("name", ["adamw", "galore", "rgp8bit"])
def test_layerwise_equals_normal_with_grad_accum(name):
    accum, steps = 2, 4
    cfg = OptimConfig(name=name, lr=1e-2, rank=8, update_proj_gap=2, weight_decay=0.01)

    ref = _model()
    opt = build_optimizer(ref, cfg)
    for t in range(steps):
        for group in opt.param_groups:
            group["lr"] = _lr(t)
        for k in range(accum):
            _, loss = ref(*_micro(t, k))
            (loss / accum).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    model = _model()
    lopt = build_optimizer(model, cfg)
    stepper = LayerwiseStepper(lopt)
    n_params = len(list(model.parameters()))
    for t in range(steps):
        for group in lopt.param_groups:
            group["lr"] = _lr(t)
        for k in range(accum):
            _, loss = model(*_micro(t, k))
            if k == accum - 1:
                with stepper.armed():
                    (loss / accum).backward()
                assert stepper.stepped == n_params
                assert all(p.grad is None for p in model.parameters())
            else:
                (loss / accum).backward()
                assert all(p.grad is not None for p in model.parameters())   # accumulating, not stepped
    for (n, a), (_, b) in zip(ref.named_parameters(), model.named_parameters()):
        assert torch.equal(a, b), n
    stepper.remove()


def test_grads_are_freed_during_backward():
    """Peak memory never holds a full set of gradients: when the last hook fires, earlier params' grads are gone."""
    model = _model()
    opt = build_optimizer(model, OptimConfig(name="adamw"))
    stepper = LayerwiseStepper(opt)
    live = []
    params = list(model.parameters())
    orig = stepper._hook

    def counting_hook(p):
        live.append(sum(q.grad is not None for q in params))
        orig(p)

    stepper._hook = counting_hook
    for h in stepper._handles:
        h.remove()
    stepper._handles = [p.register_post_accumulate_grad_hook(stepper._hook) for p in params]
    _, loss = model(*_micro(0, 0))
    with stepper.armed():
        loss.backward()
    assert max(live) < len(params) // 2


def test_needs_our_optimizer():
    with pytest.raises(ValueError, match="step_param"):
        LayerwiseStepper(torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1))
