"""2-process worker (torchrun, gloo): every optimizer x grad mode, identical-batch exactness, sharded
checkpoints 2 -> 1 (save here) and 1 -> 2 (load here), bf16 masters. Rank 0 writes OUT/results_torchrun.pt.

    torchrun --nproc_per_node=2 tests/distributed/worker_torchrun.py OUT_DIR CKPT1_DIR NAMES
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _dist_common as C  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from optim.sharded import ShardedOptimizer, load_optimizer_shards, save_optimizer_shards  # noqa: E402


def main(out: Path, ckpt1: Path, names: list[str]):
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    res = {}

    def sharded(model, name, mode):
        return ShardedOptimizer(list(model.named_parameters()), C.make_cfg(name), grad_mode=mode)

    for name in names:
        for mode in ("allreduce", "reduce"):
            model = C.tiny_model()
            opt = sharded(model, name, mode)
            C.train(model, opt, 0, C.STEPS, rank, world, clip=0.0)
            res[f"{name}/{mode}"] = C.weights(model)
            res[f"{name}/{mode}/agree"] = C.ranks_agree(model)
            sb = torch.tensor([opt.state_bytes(), len(opt.owned)])
            allsb = [torch.zeros_like(sb) for _ in range(world)]
            dist.all_gather(allsb, sb)
            res[f"{name}/{mode}/state_bytes"] = [int(t[0]) for t in allsb]
            res[f"{name}/{mode}/owned"] = [int(t[1]) for t in allsb]
        model = C.tiny_model()
        opt = sharded(model, name, "reduce")
        C.train(model, opt, 0, C.STEPS, rank, world, identical=True, clip=0.0)
        res[f"{name}/identical"] = C.weights(model)
        model = C.tiny_model()                   # clipping on: a sliced tensor's norm is summed over its slices
        opt = sharded(model, name, "reduce")
        C.train(model, opt, 0, C.STEPS, rank, world)
        res[f"{name}/clipped"] = C.weights(model)
        res[f"{name}/clipped/norm"] = float(opt.last_grad_norm)

    for name in [n for n in ("galore", "rgp8bit") if n in names]:
        # 2 -> 1: save at step 3, keep going to STEPS (the uninterrupted 2-rank run)
        model = C.tiny_model()
        opt = sharded(model, name, "reduce")
        C.train(model, opt, 0, 3, rank, world, clip=0.0)
        d = out / "ckpt2" / name
        save_optimizer_shards(opt, d)
        if rank == 0:
            torch.save(model.state_dict(), d / "model.pt")
        C.train(model, opt, 3, C.STEPS, rank, world, clip=0.0)
        res[f"ckpt2/{name}/uninterrupted"] = C.weights(model)
        # 1 -> 2: continue the 1-rank checkpoint written by the test
        src = ckpt1 / name
        if src.is_dir():
            model = C.tiny_model(seed=123)
            model.load_state_dict(torch.load(src / "model.pt", weights_only=True))
            opt = sharded(model, name, "allreduce")
            load_optimizer_shards(opt, src)
            C.train(model, opt, 3, C.STEPS, rank, world, clip=0.0)
            res[f"ckpt1to2/{name}"] = C.weights(model)
            res[f"ckpt1to2/{name}/agree"] = C.ranks_agree(model)

    # low-rank gradient communication (clipping off: it measures what the optimizer sees), every projected
    # optimizer x grad mode; and a checkpoint at step 3 resumed by fresh wrappers (non-owner bases rebuilt)
    def run_with_checkpoint(cfg, mode, dtype, stop, d):
        """Train to `stop` with a checkpoint at step 3; resume that checkpoint with fresh wrappers to `stop`.
        Returns (model, optimizer, resumed model)."""
        model = C.tiny_model(dtype=dtype)
        opt = ShardedOptimizer(list(model.named_parameters()), cfg, grad_mode=mode)
        C.train(model, opt, 0, 3, rank, world, clip=0.0)
        save_optimizer_shards(opt, d)
        if rank == 0:
            torch.save(model.state_dict(), d / "model.pt")
        dist.barrier()
        C.train(model, opt, 3, stop, rank, world, clip=0.0)
        model2 = C.tiny_model(seed=7, dtype=dtype)
        model2.load_state_dict(torch.load(d / "model.pt", weights_only=True))
        opt2 = ShardedOptimizer(list(model2.named_parameters()), cfg, grad_mode=mode)
        load_optimizer_shards(opt2, d)
        C.train(model2, opt2, 3, stop, rank, world, clip=0.0)
        return model, opt, model2

    for name in [n for n in names if n in C.PROJECTED_NAMES]:
        for mode in ("allreduce", "reduce"):
            cfg = C.make_cfg(name)
            cfg.lowrank_comm = True
            model, _, model2 = run_with_checkpoint(cfg, mode, torch.float32, C.STEPS, out / "lowrank" / f"{name}_{mode}")
            res[f"lowrank/{name}/{mode}"] = C.weights(model)
            res[f"lowrank/{name}/{mode}/agree"] = C.ranks_agree(model)
            res[f"lowrank/{name}/{mode}/resumed"] = C.weights(model2)

    # low-rank updates as well (optim.lowrank_update): fp32 against the single process; bf16 with its fp32 copies
    # on every rank, through a checkpoint (non-owners' copies rebuilt from the owners' masters)
    for name in [n for n in names if n in C.PROJECTED_NAMES]:
        for dtype in (torch.float32, torch.bfloat16) if name == "rgp" else (torch.float32,):
            cfg = C.make_cfg(name)
            cfg.lowrank_comm = cfg.lowrank_update = True
            d = out / "lowrank_update" / f"{name}_{str(dtype)[6:]}"
            model, opt, model2 = run_with_checkpoint(cfg, "reduce", dtype, 4 * C.STEPS, d)
            key = f"lowrank_update/{name}/{str(dtype)[6:]}"
            res[key] = C.weights(model)
            res[key + "/agree"] = C.ranks_agree(model)
            copies = torch.cat([r.detach().reshape(-1) for _, r in sorted(opt.replicas.items())])
            first = copies.clone()
            dist.broadcast(first, 0)
            same = torch.tensor([int(torch.equal(first, copies))])
            dist.all_reduce(same, op=dist.ReduceOp.MIN)
            res[key + "/copies_agree"] = bool(same.item())
            res[key + "/resumed"] = C.weights(model2)

    # the ledger of one real step (compared with the fake-process-group count in the test)
    from optim.comm import CommLedger
    for mode in ("allreduce", "reduce"):
        model = C.tiny_model()
        opt = sharded(model, "rgp", mode)
        opt.ledger = CommLedger(world)
        C.train(model, opt, 0, 1, rank, world)
        res[f"ledger/{mode}"] = opt.ledger.totals()

    # bf16: fp32 masters on owners only
    model = C.tiny_model(dtype=torch.bfloat16)
    opt = sharded(model, "galore" if "galore" in names else names[0], "reduce")
    C.train(model, opt, 0, 2, rank, world)
    info = torch.tensor([len(opt.masters), len(opt.owned),
                         int(all(m.dtype == torch.float32 for m in opt.masters.values())),
                         int(all(p.dtype == torch.bfloat16 for p in model.parameters())),
                         int(set(opt.masters) == {n for n, _ in opt.owned})])
    allinfo = [torch.zeros_like(info) for _ in range(world)]
    dist.all_gather(allinfo, info)
    res["bf16/info"] = [t.tolist() for t in allinfo]
    res["bf16/agree"] = C.ranks_agree(model)
    res["bf16/finite"] = all(bool(torch.isfinite(p).all()) for p in model.parameters())

    if rank == 0:
        torch.save(res, out / "results_torchrun.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3].split(","))
