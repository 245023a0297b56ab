"""2-process worker under the `deepspeed` launcher: every optimizer x ZeRO stage (1, 2) through
optim.deepspeed_glue.init_deepspeed, with 2 accumulation micro-steps per rank; zero3 refused.
Rank 0 writes OUT/results_deepspeed.pt.

    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 tests/distributed/worker_deepspeed.py OUT_DIR NAMES
"""
import json
import os
import time
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _dist_common as C  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from optim.deepspeed_glue import DeepSpeedConfigError, init_deepspeed, read_deepspeed_config  # noqa: E402
from optim.sharded import ShardedOptimizer  # noqa: E402

ACCUM = 2


def ds_config(out: Path, stage: int) -> Path:
    path = out / f"zero{stage}_rank{os.environ.get('RANK', '0')}.json"   # one file per rank: no write race
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": C.GLOBAL_BATCH // 2 // ACCUM,
                                "gradient_accumulation_steps": ACCUM, "gradient_clipping": C.CLIP,
                                "bf16": {"enabled": False}, "zero_optimization": {"stage": stage},
                                "steps_per_print": 10**9}))
    return path


def main(out: Path, names: list[str]):
    args = [a for a in sys.argv if not a.startswith("--local_rank")]  # the launcher adds --local_rank=N
    del args
    torch.set_num_threads(1)
    import deepspeed
    deepspeed.init_distributed(dist_backend="gloo")   # before any ShardedOptimizer is built
    res = {}
    for name in names:
        for stage in (1, 2):
            model = C.tiny_model()
            ds = read_deepspeed_config(ds_config(out, stage), 2)
            opt = ShardedOptimizer(list(model.named_parameters()), C.make_cfg(name), grad_mode=ds.grad_mode)
            t0 = time.time()
            engine = init_deepspeed(model, opt, ds)
            print(f"[rank {dist.get_rank()}] {name} zero{stage} init {time.time() - t0:.1f}s", flush=True)
            calls = []
            inner_step = opt.inner.step if opt.inner is not None else (lambda: None)
            if opt.inner is not None:
                opt.inner.step = lambda *a, **k: (calls.append(1), inner_step())[1]
            rank, world = dist.get_rank(), dist.get_world_size()
            t0 = time.time()
            # stage 1: the trainer syncs and clips itself; stage 2: it calls engine.step() only
            C.train(model, opt, 0, C.STEPS, rank, world, accum=ACCUM, engine=engine, explicit_sync=stage == 1)
            print(f"[rank {rank}] train {time.time() - t0:.1f}s", flush=True)
            key = f"{name}/zero{stage}"
            res[key] = C.weights(model)
            res[key + "/agree"] = C.ranks_agree(model)
            res[key + "/mode"] = opt.grad_mode
            res[key + "/engine_optimizer"] = type(engine.optimizer).__name__
            res[key + "/inner_steps"] = len(calls)
            res[key + "/owned"] = len(opt.owned)
            res[key + "/grad_norm"] = float(opt.last_grad_norm)
            res[key + "/backward_allreduce"] = bool(engine.enable_backward_allreduce)
    # low-rank gradient communication under the engine (stage 2, clipping off); rgp with low-rank updates too
    for name in [n for n in names if n in C.PROJECTED_NAMES] + ["rgp+update"]:
        model = C.tiny_model()
        ds = read_deepspeed_config(ds_config(out, 2), 2)
        cfg = C.make_cfg(name.split("+")[0])
        cfg.lowrank_comm = True
        cfg.lowrank_update = name.endswith("+update")
        opt = ShardedOptimizer(list(model.named_parameters()), cfg, grad_mode=ds.grad_mode)
        engine = init_deepspeed(model, opt, ds)
        C.train(model, opt, 0, C.STEPS, dist.get_rank(), dist.get_world_size(), accum=ACCUM, engine=engine,
                clip=0.0)
        res[f"lowrank/{name}"] = C.weights(model)
        res[f"lowrank/{name}/agree"] = C.ranks_agree(model)
    # bf16 in the ds_config: we cast the model ourselves, the engine must not wrap our optimizer
    path = ds_config(out, 2)
    conf = json.loads(path.read_text())
    conf["bf16"] = {"enabled": True}
    path = out / f"bf16_rank{os.environ.get('RANK', '0')}.json"
    path.write_text(json.dumps(conf))
    ds = read_deepspeed_config(path, 2)
    model = C.tiny_model(dtype=torch.bfloat16 if ds.bf16 else torch.float32)
    made = {"opt": ShardedOptimizer(list(model.named_parameters()), C.make_cfg(names[0]), grad_mode=ds.grad_mode)}
    engine = init_deepspeed(model, made["opt"], ds)
    C.train(model, made["opt"], 0, 2, dist.get_rank(), dist.get_world_size(), accum=ACCUM, engine=engine)
    res["bf16/engine_optimizer"] = type(engine.optimizer).__name__
    res["bf16/param_dtypes"] = sorted({str(p.dtype) for p in model.parameters()})
    res["bf16/master_dtypes"] = sorted({str(m.dtype) for m in made["opt"].masters.values()})
    res["bf16/masters_owned"] = len(made["opt"].masters) == len(made["opt"].owned)
    res["bf16/agree"] = C.ranks_agree(model)
    res["bf16/settings"] = {"bf16": ds.bf16, "grad_accum": ds.grad_accum, "micro_batch": ds.micro_batch,
                            "grad_clip": ds.grad_clip, "zero_stage": ds.zero_stage}
    # what engine.save_checkpoint writes with our optimizer at stage 0
    engine.save_checkpoint(str(out / "dsckpt"), tag="t")
    dist.barrier()
    res["ds_checkpoint_files"] = sorted(p.name for p in (out / "dsckpt" / "t").iterdir())
    try:
        init_deepspeed(C.tiny_model(), None, ds_config(out, 3))
        res["zero3"] = "accepted"
    except DeepSpeedConfigError as e:
        res["zero3"] = str(e)
    if dist.get_rank() == 0:
        torch.save(res, out / "results_deepspeed.pt")
    dist.barrier()


if __name__ == "__main__":
    pos = [a for a in sys.argv[1:] if not a.startswith("--")]
    main(Path(pos[0]), pos[1].split(","))
