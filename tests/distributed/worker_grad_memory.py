"""Peak gradient bytes of one rank (a high-water mark of gradient tensors, wire buffers and fp32 accumulators)
for the 60M model in fp32 at stage 2 ("reduce"), 2 micro-batches, under torchrun with 1 or 2 processes (at 1
the collectives are forced on, so the same code path runs). Writes OUT/grad_memory_w{world}.json (rank 0).

    torchrun --nproc_per_node=N tests/distributed/worker_grad_memory.py OUT
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from config import OptimConfig  # noqa: E402
from model import build_model  # noqa: E402
from optim.sharded import ShardedOptimizer  # noqa: E402


def main(out: Path):
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = build_model("60m", 32000, 16)
    opt = ShardedOptimizer(list(model.named_parameters()), OptimConfig(name="adamw"), grad_mode="reduce",
                           collectives_at_world_size_1=True)
    opt.track_grad_memory = True
    g = torch.Generator().manual_seed(rank)
    for _ in range(2):                                   # two micro-batches, each reduced as it is produced
        x = torch.randint(0, 32000, (1, 17), generator=g)
        (model(x[:, :-1], x[:, 1:])[1] / 2).backward()
    opt.sync_gradients()
    full = sum(p.numel() * 4 for p in model.parameters())
    peaks, owned = [None] * world, [None] * world
    dist.all_gather_object(peaks, opt.grad_bytes_peak)
    dist.all_gather_object(owned, sum(p.numel() * 4 for _, p in opt.owned))
    largest = max(p.numel() * 4 for p in model.parameters())
    if rank == 0:
        (out / f"grad_memory_w{world}.json").write_text(json.dumps(
            {"peaks": peaks, "owned_bytes": owned, "largest_param_bytes": largest, "full_grad_bytes": full}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
