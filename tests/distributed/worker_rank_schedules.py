"""2-process worker (torchrun, gloo) for tests/distributed/test_rank_schedules_dp.py: rgp with a decaying and with
an adaptive rank under the sharded optimizer (default mode), and a 2-rank checkpoint at step 3. Rank 0 writes
OUT/results_rank_schedules.pt.

    torchrun --nproc_per_node=2 tests/distributed/worker_rank_schedules.py OUT_DIR
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _dist_common as C  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from optim.sharded import ShardedOptimizer, save_optimizer_shards  # noqa: E402

CASES = {"decay": dict(rank_decay=2.0, min_rank=2), "energy": dict(rank_energy=0.9, min_rank=1)}


def cfg_of(case):
    cfg = C.make_cfg("rgp")
    for k, v in CASES[case].items():
        setattr(cfg, k, v)
    return cfg


def main(out: Path):
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    res = {}
    for case in CASES:
        model = C.tiny_model()
        opt = ShardedOptimizer(list(model.named_parameters()), cfg_of(case), grad_mode="reduce")
        C.train(model, opt, 0, 3, rank, world, clip=0.0)      # bit-exact: clipping off (test_multiprocess.py)
        d = out / "ckpt2" / case
        save_optimizer_shards(opt, d)
        if rank == 0:
            torch.save(model.state_dict(), d / "model.pt")
        C.train(model, opt, 3, C.STEPS, rank, world, clip=0.0)
        res[case] = C.weights(model)
        res[f"{case}/agree"] = C.ranks_agree(model)
        owned = opt.inner.current_ranks() if opt.inner is not None else {}   # each owner's own matrices
        gathered = [None] * world
        dist.all_gather_object(gathered, owned)
        res[f"{case}/ranks"] = {n: r for part in gathered for n, r in part.items()}
        res[f"{case}/owners"] = [sorted(part) for part in gathered]
        res[f"{case}/wrapper_ranks"] = opt.current_ranks()        # the wrapper's own gather (train.py's metrics)
    if rank == 0:
        torch.save(res, out / "results_rank_schedules.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
