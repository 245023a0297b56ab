"""Rank schedules under 2 gloo processes (docs/design.md, "Rank schedules and basis precision"): rgp with
optim.rank_decay and with optim.rank_energy in the sharded optimizer's default mode gives the weights and the
per-matrix ranks of one process (bit for bit against the exact "split" reference of test_multiprocess.py: one
process accumulating the two ranks' halves), and a 2-rank checkpoint resumes on 1 rank with those weights."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _dist_common as C  # noqa: E402
from worker_rank_schedules import CASES, cfg_of  # noqa: E402

from optim.sharded import ShardedOptimizer, load_optimizer_shards  # noqa: E402
from tests.helpers import free_port  # noqa: E402

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def results(tmp_path_factory, one_thread):
    out = tmp_path_factory.mktemp("rank_schedules")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(C.REPO))
    cmd = ["torchrun", "--nproc_per_node=2", f"--master_port={free_port()}", str(HERE / "worker_rank_schedules.py"),
           str(out)]
    proc = subprocess.run(cmd, cwd=C.REPO, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return out, torch.load(out / "results_rank_schedules.pt", weights_only=True)


def single(case, start=0, stop=C.STEPS, model=None, opt=None):
    """One process accumulating the two ranks' halves as two micro-batches: the exact reference."""
    model = model or C.tiny_model()
    opt = opt or ShardedOptimizer(list(model.named_parameters()), cfg_of(case))
    C.train(model, opt, start, stop, accum=2, clip=0.0)   # clipping off: a sliced norm is not bit-exact
    return model, opt


@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_equal_one(results, case):
    _, res = results
    model, opt = single(case)
    assert res[f"{case}/agree"], "ranks hold different weights"
    want = C.weights(model)
    for n in want:
        assert torch.equal(res[case][n], want[n]), f"{case}: {n} differs"
    ranks = opt.inner.current_ranks()
    assert res[f"{case}/ranks"] == ranks                       # each owner reports its own matrices
    assert res[f"{case}/wrapper_ranks"] == ranks               # ShardedOptimizer.current_ranks gathers them
    assert all(res[f"{case}/owners"]) and len(ranks) == 2 * 7    # both ranks own matrices; 2 layers x 7 matrices
    if case == "decay":
        assert set(ranks.values()) == {2}                    # refreshes at steps 0, 2, 4: 8 -> 4 -> 2
    else:
        assert min(ranks.values()) < 8                       # the energy rule chose below the cap somewhere


@pytest.mark.parametrize("case", list(CASES))
def test_two_rank_checkpoint_resumes_on_one(results, case):
    out, res = results
    d = out / "ckpt2" / case
    model = C.tiny_model(seed=7)
    model.load_state_dict(torch.load(d / "model.pt", weights_only=True))
    opt = ShardedOptimizer(list(model.named_parameters()), cfg_of(case))
    load_optimizer_shards(opt, d)
    assert min(opt.inner.current_ranks().values()) < 8            # the saved, already smaller bases
    single(case, 3, C.STEPS, model, opt)
    for n, w in C.weights(model).items():
        assert torch.equal(w, res[case][n]), f"{case}: {n} differs after the 2 -> 1 resume"
