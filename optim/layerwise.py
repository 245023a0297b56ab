"""Layer-wise update mode (`optim.layerwise`): step each parameter inside its post-accumulate-grad hook and
free its gradient at once, so the full set of gradients never exists at the same time.

    stepper = LayerwiseStepper(optimizer)              # hooks on every parameter of the optimizer
    for step in range(max_steps):
        for group in optimizer.param_groups:           # set the LR *before* the last backward:
            group["lr"] = cfg.lr * schedule(step)      # the hooks step with whatever lr is set then
        for micro in range(grad_accum):
            loss = model(...) / grad_accum
            if micro == grad_accum - 1:
                with stepper.armed():                  # only the last micro-step of the window steps
                    loss.backward()
            else:
                loss.backward()                        # gradients accumulate as usual
        # no optimizer.step() / zero_grad(): the hooks did both for every parameter that got a gradient

Gradient accumulation: a hook fires after *each* backward's accumulation into `p.grad`; unarmed, it does
nothing, so the micro-steps of a window accumulate normally, and the armed (last) backward sees the fully
accumulated gradient - the update is the same as a normal `optimizer.step()` after the window (GaLore's
layer-wise example stepped on every micro-step, its issue #78).  Because each update depends only on the
parameter's own gradient and state (see optim/adam.py), the result is identical to the normal mode.

Global gradient-norm clipping is impossible here: a parameter is updated before the other gradients exist.
Clipping is therefore disabled in this mode; the trainer refuses `train.grad_clip > 0` with `optim.layerwise`.
Parameters that get no gradient in the armed backward are not stepped (as `optimizer.step()` skips
`grad is None`).  Under DDP the hooks fire on each rank's local gradient before the all-reduce, so the
layer-wise mode is for single-process runs or owner-computes wrappers that reduce the gradient first.
"""
from __future__ import annotations

import contextlib
from typing import Iterable

import torch


class LayerwiseStepper:
    def __init__(self, optimizer, params: Iterable[torch.Tensor] | None = None):
        if not hasattr(optimizer, "step_param"):
            raise ValueError("LayerwiseStepper needs an optimizer with step_param(p) (build it with "
                             "optim.build_optimizer)")
        self.optimizer = optimizer
        if params is None:
            params = [p for g in optimizer.param_groups for p in g["params"]]
        self.params = list(params)
        self.is_armed = False
        self.stepped = 0                       # parameters stepped since the last arm()
        self._handles = [p.register_post_accumulate_grad_hook(self._hook) for p in self.params
                         if p.requires_grad]

    def _hook(self, p: torch.Tensor) -> None:
        if not self.is_armed:
            return
        self.optimizer.step_param(p)
        p.grad = None
        self.stepped += 1

    def arm(self) -> None:
        """The next backward steps and frees each parameter as its gradient is complete."""
        self.is_armed = True
        self.stepped = 0

    def disarm(self) -> None:
        self.is_armed = False

    @contextlib.contextmanager
    def armed(self):
        self.arm()
        try:
            yield self
        finally:
            self.disarm()

    def remove(self) -> None:
        """Remove the hooks (back to the normal mode)."""
        for h in self._handles:
            h.remove()
        self._handles = []
