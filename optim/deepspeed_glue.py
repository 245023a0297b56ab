"""Run the sharded optimizer under `deepspeed.initialize` with an ordinary ds_config.

What DeepSpeed does and does not do here (read from deepspeed 0.19.8 `runtime/engine.py`, checked by
tests/distributed):
- We honour the user's stage 1 / 2 by *our* whole-matrix ownership (stage 1 -> grad_mode "allreduce",
  stage 2 -> "reduce") and hand DeepSpeed a config at stage 0, so it never flattens parameters into
  1-D partitions. Stage 3, offload, fp16 and unknown optimizer sections are refused up front.
- The engine runs without gradient clipping (`gradient_clipping` 0) and with
  `enable_backward_allreduce = False`: our optimizer owns gradient communication and clips with the
  global norm across owners. At stage 0, `engine.step()` calls `optimizer.step()` only at the
  accumulation boundary, and calls nothing else first, so the wrapper is put in `sync_in_step` mode:
  its `step()` does sync -> clip -> inner step -> broadcast. The norm is then `opt.last_grad_norm`
  (also `engine.get_global_grad_norm()`).
- Accumulation: `engine.backward(loss)` divides the loss by `gradient_accumulation_steps` and
  `engine.step()` must be called after every micro-batch (it steps on the boundary only, then sets
  every `param.grad = None`).
- bf16: with `bf16.enabled` at stage 0 the engine wraps the client optimizer in `BF16_Optimizer` /
  `FP16_UnfusedOptimizer`, which keep an fp32 clone of *every* parameter on every rank (and
  `FP16_UnfusedOptimizer` steps once with zero gradients at construction). We instead cast the model to
  bf16 ourselves and strip `bf16` from the engine's config; the sharded optimizer keeps fp32 masters
  for owned parameters only. (Without bf16 in its config the engine leaves parameter dtypes alone.)
- Checkpoints: `engine.save_checkpoint` would store `optimizer.state_dict()` from rank 0 only; use
  `optim.sharded.save_optimizer_shards` / `load_optimizer_shards` and the module's own state_dict.

Trainer loop under DeepSpeed:
    engine, settings = init_deepspeed(model, lambda mode: ShardedOptimizer(named, cfg.optim, grad_mode=mode), path)
    for micro in range(settings["grad_accum"]):
        loss = engine(x, y)[1]; engine.backward(loss); engine.step()
    norm = opt.last_grad_norm
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

STAGE_TO_MODE = {0: "allreduce", 1: "allreduce", 2: "reduce"}


class DeepSpeedConfigError(ValueError):
    """A ds_config we cannot honour; the message is one line naming the fix."""


def read_settings(ds_config) -> tuple[dict, dict]:
    """(settings the trainer uses, the stage-0 config handed to deepspeed.initialize)."""
    if isinstance(ds_config, (str, Path)):
        path = Path(ds_config)
        if not path.is_file():
            raise DeepSpeedConfigError(f"DeepSpeed config {str(path)!r} not found; pass e.g. configs/deepspeed/zero2.json")
        conf = json.loads(path.read_text())
    else:
        conf = copy.deepcopy(ds_config)
    zero = conf.get("zero_optimization", {}) or {}
    stage = int(zero.get("stage", 0))
    if stage not in STAGE_TO_MODE:
        raise DeepSpeedConfigError(f"zero_optimization.stage {stage} is not supported with projected optimizers "
                                   f"(whole-matrix ownership needs whole matrices); use stage 1 or 2")
    for key in ("offload_optimizer", "offload_param"):
        if zero.get(key) and (zero[key].get("device", "none") if isinstance(zero[key], dict) else zero[key]) != "none":
            raise DeepSpeedConfigError(f"zero_optimization.{key} is not supported by the sharded optimizer; remove it")
    if (conf.get("fp16") or {}).get("enabled"):
        raise DeepSpeedConfigError("fp16 is not supported (needs loss scaling and fails on CPU); use bf16.enabled or fp32")
    if conf.get("optimizer") or conf.get("scheduler"):
        raise DeepSpeedConfigError("remove the 'optimizer'/'scheduler' sections: the optimizer and LR schedule come "
                                   "from the run config (--optim.*, --train.*)")
    micro = conf.get("train_micro_batch_size_per_gpu")
    accum = conf.get("gradient_accumulation_steps", 1)
    if not isinstance(micro, int) or micro < 1:
        raise DeepSpeedConfigError("DeepSpeed config needs an integer train_micro_batch_size_per_gpu >= 1")
    if not isinstance(accum, int) or accum < 1:
        raise DeepSpeedConfigError("gradient_accumulation_steps must be an integer >= 1")
    settings = {"micro_batch": micro, "grad_accum": accum,
                "grad_clip": float(conf.get("gradient_clipping", 0.0) or 0.0),
                "bf16": bool((conf.get("bf16") or {}).get("enabled", False)),
                "stage": stage, "grad_mode": STAGE_TO_MODE[stage]}
    patched = {k: v for k, v in conf.items()
               if k not in ("zero_optimization", "bf16", "gradient_clipping", "train_batch_size")}
    patched["zero_optimization"] = {"stage": 0}
    patched["gradient_clipping"] = 0.0
    patched["train_micro_batch_size_per_gpu"] = micro
    patched["gradient_accumulation_steps"] = accum
    patched.setdefault("steps_per_print", 10**9)
    patched.setdefault("wall_clock_breakdown", False)
    return settings, patched


def init_deepspeed(model: torch.nn.Module, make_optimizer, ds_config):
    """deepspeed.initialize with our sharded optimizer. Returns (engine, settings).

    make_optimizer(grad_mode) -> ShardedOptimizer, called after the model is cast (bf16 configs), so
    fp32 masters are taken from the weights the engine will train. (A ready ShardedOptimizer is
    accepted too; its grad_mode is then overwritten from the stage.)
    """
    import deepspeed
    settings, patched = read_settings(ds_config)
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    if settings["bf16"]:
        model.to(torch.bfloat16)
    if callable(make_optimizer) and not hasattr(make_optimizer, "sync_gradients"):
        opt = make_optimizer(settings["grad_mode"])
    else:
        opt = make_optimizer
        opt.grad_mode = settings["grad_mode"]
    opt.sync_in_step = True
    opt.clip_in_step = settings["grad_clip"]
    # A callable is used as a factory by the engine (our wrapper is not a torch.optim.Optimizer).
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=lambda _params: opt, config=patched)
    engine.enable_backward_allreduce = False
    if engine.optimizer is not opt:
        raise RuntimeError(f"DeepSpeed wrapped the optimizer in {type(engine.optimizer).__name__}; "
                           f"expected it to use ShardedOptimizer directly at stage 0")
    settings["optimizer"] = opt
    return engine, settings
