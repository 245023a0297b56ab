"""Run the sharded optimizer under `deepspeed.initialize` with an ordinary ds_config.

    ds = read_deepspeed_config("configs/deepspeed/zero2.json", world_size)   # stage, bf16; batch keys if it has them
    dtype = reconcile_with_run(ds, cfg.train, world_size)                    # the run config fills/validates them
    model.to(torch.bfloat16) if ds.bf16 else None                             # before building the optimizer
    opt = ShardedOptimizer(model.named_parameters(), cfg.optim, grad_mode=ds.grad_mode)
    engine = init_deepspeed(model, opt, ds)
    each optimizer step: the DeepSpeed protocol in the module docstring of optim/sharded.py (written once there)

What DeepSpeed does and does not do here (deepspeed 0.19.8 `runtime/engine.py`, checked by tests/distributed):
- Stage. We honour the user's stage 1 / 2 with *our* layout (optim/ownership.py; stage 1 -> grad_mode
  "allreduce", stage 2 -> "reduce") and hand DeepSpeed a config at stage 0, so it never flattens the
  parameters into 1-D partitions. Stage 3, offload, fp16, `optimizer`/`scheduler` sections and an
  inconsistent `train_batch_size` are refused up front with a one-line error.
- Communication and clipping. The engine gets `gradient_clipping: 0` and `enable_backward_allreduce =
  False`: the sharded optimizer owns gradient communication and clips with the global norm across owners.
- One source of batch settings: the run config (`train.micro_batch`, `train.grad_accum` or
  `train.global_batch`, `train.grad_clip`, `train.dtype`). The JSON may leave these keys out (the shipped
  configs do) or restate them; a JSON value that differs from the resolved run value is a one-line error,
  never a silent override, because `engine.backward` divides by the JSON's accumulation while the trainer
  runs the run's: a recipe with `global_batch = 512` under a JSON with accumulation 1 would sum 8
  micro-batch means at 8 ranks. `reconcile_with_run` writes the run's values into the engine config.
  Precision: `bf16.enabled` decides when `train.dtype = "auto"`; an explicit dtype must agree with it.
- Accumulation. `engine.backward(loss)` divides the loss by `gradient_accumulation_steps`. The engine's
  config gets `managed_gradient_accumulation: false`, so *every* `engine.step()` is an accumulation
  boundary: the trainer calls it once per optimizer step, after its micro-batches (in DeepSpeed's default
  managed mode it would have to be called after every micro-batch and would count them). At stage 0 fp32,
  `engine.step()` calls `optimizer.step()` and then sets every `param.grad = None`; nothing else.
  Since the engine calls only `step()`, the wrapper runs in `sync_in_step` mode: if the trainer did not call
  `sync_gradients()` / `clip_grad_norm_()` itself, `step()` does them (clip = the config's
  `gradient_clipping`); if it did, they are not repeated. The norm is `opt.last_grad_norm`.
- bf16. With `bf16.enabled` at stage 0 the engine wraps the client optimizer in `BF16_Optimizer` /
  `FP16_UnfusedOptimizer`, which keep an fp32 clone of *every* parameter on every rank (and
  `FP16_UnfusedOptimizer` steps once with all-zero gradients at construction: an SVD of zeros). Instead the
  model is cast to bf16 before the optimizer is built (fp32 masters for owned parameters only) and `bf16` is
  removed from the engine's config; without it the engine leaves parameter dtypes alone.
- Checkpoints. `engine.save_checkpoint` writes `mp_rank_00_model_states.pt` with `optimizer.state_dict()`
  of rank 0 only, i.e. half the optimizer state at 2 ranks: use `optim.sharded.save_optimizer_shards` /
  `load_optimizer_shards` (checkpoint.py does) and the module's own state_dict.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

STAGE_TO_MODE = {0: "allreduce", 1: "allreduce", 2: "reduce"}


class DeepSpeedConfigError(ValueError):
    """A ds_config we cannot honour; the message is one line naming the fix."""


@dataclass
class DeepSpeedSettings:
    micro_batch: int | None     # train_micro_batch_size_per_gpu (None: not in the JSON, the run config gives it)
    grad_accum: int | None      # gradient_accumulation_steps (None: idem)
    grad_clip: float | None     # gradient_clipping, 0: off (None: idem)
    bf16: bool | None           # bf16.enabled (None: idem)
    zero_stage: int             # zero_optimization.stage (0, 1 or 2), honoured by the sharded optimizer
    grad_mode: str              # "allreduce" (stage 0/1) or "reduce" (stage 2)
    engine_config: dict = field(default_factory=dict)   # what deepspeed.initialize gets (stage 0, no clip/bf16)
    train_batch_size: int | None = None                 # train_batch_size, when the JSON states it
    comm_dtype: str | None = None                        # communication_data_type as optim.comm_dtype's value


def read_deepspeed_config(ds_config, world_size: int | None = None) -> DeepSpeedSettings:
    """Read a ds_config (path or dict); refuse what the sharded optimizer cannot honour."""
    if isinstance(ds_config, (str, Path)):
        path = Path(ds_config)
        if not path.is_file():
            raise DeepSpeedConfigError(f"DeepSpeed config {str(path)!r} not found; pass e.g. configs/deepspeed/zero2.json")
        try:
            conf = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise DeepSpeedConfigError(f"DeepSpeed config {str(path)!r} is not valid JSON: {e}") from None
    else:
        conf = copy.deepcopy(ds_config)
    zero = conf.get("zero_optimization", {}) or {}
    stage = int(zero.get("stage", 0))
    if stage not in STAGE_TO_MODE:
        raise DeepSpeedConfigError(f"zero_optimization.stage {stage} is not supported with projected optimizers "
                                   f"(projected matrices need whole weights on their owner); use stage 1 or 2")
    for key in ("offload_optimizer", "offload_param"):
        if zero.get(key) and (zero[key].get("device", "none") if isinstance(zero[key], dict) else zero[key]) != "none":
            raise DeepSpeedConfigError(f"zero_optimization.{key} is not supported by the sharded optimizer; remove it")
    if (conf.get("fp16") or {}).get("enabled"):
        raise DeepSpeedConfigError("fp16 is not supported (needs loss scaling, and fails on CPU); use bf16.enabled or fp32")
    if conf.get("optimizer") or conf.get("scheduler"):
        raise DeepSpeedConfigError("remove the 'optimizer'/'scheduler' sections: the optimizer and LR schedule come "
                                   "from the run config (--optim.*, --train.*)")
    micro = conf.get("train_micro_batch_size_per_gpu")
    accum = conf.get("gradient_accumulation_steps")
    total = conf.get("train_batch_size")
    for key, value in [("train_micro_batch_size_per_gpu", micro), ("gradient_accumulation_steps", accum),
                       ("train_batch_size", total)]:
        if value is not None and (not isinstance(value, int) or value < 1):
            raise DeepSpeedConfigError(f"{key} must be an integer >= 1, got {value!r}; or leave it out and let "
                                       f"the run config (--train.*) set it")
    if total is not None and micro and accum and world_size and total != micro * accum * world_size:
        raise DeepSpeedConfigError(f"train_batch_size {total} != micro {micro} x accumulation {accum} x world "
                                   f"{world_size}; drop train_batch_size or fix it")
    comm = conf.get("communication_data_type")
    comm_dtype = {None: None, "fp32": "float32", "float32": "float32", "bf16": "bfloat16",
                  "bfloat16": "bfloat16"}.get(comm, "refused")
    if comm_dtype == "refused":
        raise DeepSpeedConfigError(f"communication_data_type {comm!r} is not supported; use fp32 or bf16 (or leave "
                                   f"it out: gradients then travel in the weights' dtype)")
    clip = conf.get("gradient_clipping")
    bf16 = (conf.get("bf16") or {}).get("enabled") if "bf16" in conf else None
    engine_config = {k: v for k, v in conf.items()
                     if k not in ("zero_optimization", "bf16", "gradient_clipping", "train_batch_size",
                                  "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                                  "communication_data_type")}
    engine_config.update({"zero_optimization": {"stage": 0}, "gradient_clipping": 0.0,
                          "managed_gradient_accumulation": False})
    engine_config.setdefault("steps_per_print", 10**9)
    engine_config.setdefault("wall_clock_breakdown", False)
    ds = DeepSpeedSettings(micro_batch=micro, grad_accum=accum,
                           grad_clip=None if clip is None else float(clip or 0.0),
                           bf16=None if bf16 is None else bool(bf16), zero_stage=stage,
                           grad_mode=STAGE_TO_MODE[stage], engine_config=engine_config, train_batch_size=total,
                           comm_dtype=comm_dtype)
    _fill_engine_batch(ds)
    return ds


def _fill_engine_batch(ds: DeepSpeedSettings) -> None:
    if ds.micro_batch is not None:
        ds.engine_config["train_micro_batch_size_per_gpu"] = ds.micro_batch
    if ds.grad_accum is not None:
        ds.engine_config["gradient_accumulation_steps"] = ds.grad_accum


def reconcile_with_run(ds: DeepSpeedSettings, train_cfg, world_size: int) -> str:
    """Make the run config the one source of batch settings (module doc): fill what the JSON leaves out from
    `train_cfg` (train.micro_batch, train.grad_accum as resolved from train.global_batch, train.grad_clip),
    refuse a JSON value that differs, and return the run's dtype ("bfloat16"/"float32"/"auto") after applying
    `bf16.enabled`. Call it after train.global_batch has been turned into train.grad_accum."""
    t = train_cfg
    fix = "remove the key from the DeepSpeed JSON (the run config is the one source of batch settings)"
    for json_key, run_key, json_value, run_value in [
            ("train_micro_batch_size_per_gpu", "train.micro_batch", ds.micro_batch, t.micro_batch),
            ("gradient_accumulation_steps", "train.grad_accum", ds.grad_accum, t.grad_accum),
            ("train_batch_size", "train.micro_batch x train.grad_accum x world size", ds.train_batch_size,
             t.micro_batch * t.grad_accum * world_size),
            ("gradient_clipping", "train.grad_clip", ds.grad_clip, t.grad_clip)]:
        if json_value is not None and json_value != run_value:
            via = f" (train.global_batch {t.global_batch} / (micro {t.micro_batch} x world {world_size}))" \
                if run_key == "train.grad_accum" and t.global_batch else ""
            knob = "train.global_batch" if via else run_key.split(" ")[0]
            raise DeepSpeedConfigError(f"DeepSpeed config sets {json_key}={json_value} but the run has {run_key}="
                                       f"{run_value}{via}; {fix}, or set --{knob} to match")
    ds.micro_batch, ds.grad_accum, ds.grad_clip = t.micro_batch, t.grad_accum, t.grad_clip
    ds.train_batch_size = t.micro_batch * t.grad_accum * world_size
    _fill_engine_batch(ds)
    if ds.bf16 is None:
        ds.bf16 = t.dtype == "bfloat16"
        return t.dtype
    wanted = "bfloat16" if ds.bf16 else "float32"
    if t.dtype not in ("auto", wanted):
        raise DeepSpeedConfigError(f"DeepSpeed config sets bf16.enabled={str(ds.bf16).lower()} but the run has "
                                   f"train.dtype={t.dtype}; set --train.dtype=auto (or {wanted}), or use a JSON "
                                   f"that matches (configs/deepspeed/zero2_cpu.json is fp32)")
    return wanted


def init_deepspeed(model: torch.nn.Module, optimizer, ds) -> "deepspeed.DeepSpeedEngine":  # noqa: F821
    """deepspeed.initialize(model, our ShardedOptimizer, stage-0 config). `ds`: DeepSpeedSettings or a path.

    Build the optimizer after casting the model to bf16 (ds.bf16), so its fp32 masters exist."""
    import deepspeed
    if not isinstance(ds, DeepSpeedSettings):
        ds = read_deepspeed_config(ds)
    if ds.micro_batch is None or ds.grad_accum is None:
        raise DeepSpeedConfigError("the DeepSpeed settings lack the micro batch / accumulation; call "
                                   "reconcile_with_run(ds, cfg.train, world_size) before init_deepspeed")
    if ds.bf16 and any(p.dtype != torch.bfloat16 for p in model.parameters()):
        raise DeepSpeedConfigError("bf16.enabled: cast the model with model.to(torch.bfloat16) before building the "
                                   "ShardedOptimizer (it keeps the fp32 masters), then call init_deepspeed")
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    if torch.distributed.get_world_size(optimizer.group) != optimizer.world_size:
        raise RuntimeError(f"the ShardedOptimizer was built for world size {optimizer.world_size} but "
                           f"{torch.distributed.get_world_size(optimizer.group)} processes run; initialise "
                           f"torch.distributed (deepspeed.init_distributed) before building it")
    optimizer.grad_mode = ds.grad_mode
    optimizer.sync_in_step = True
    optimizer.clip_in_step = ds.grad_clip or 0.0
    # Our wrapper is not a torch.optim.Optimizer, so pass a factory; the engine calls it with the params.
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=lambda _params: optimizer,
                                           config=ds.engine_config)
    engine.enable_backward_allreduce = False
    if engine.optimizer is not optimizer:
        raise RuntimeError(f"DeepSpeed wrapped the optimizer in {type(engine.optimizer).__name__}; "
                           f"expected it to use ShardedOptimizer directly at stage 0")
    return engine
