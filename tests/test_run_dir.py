"""run_dir.py through train.py: one job per run directory, one metrics curve, only resumable changes."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import train
from checkpoint import complete_checkpoints
from run_dir import RunDirError, resume_changes, start_metrics
from tests.helpers import small_run

REPO = Path(__file__).resolve().parent.parent


def metrics(out_dir):
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


def losses(out_dir):
    return [(r["step"], r["loss"]) for r in metrics(out_dir) if "loss" in r and "eval_loss" not in r]


def start_trainer(args, out_dir):
    """A second job on the directory: a trainer in its own process, returned once it has logged a step."""
    proc = subprocess.Popen([sys.executable, "train.py", *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while not ((out_dir / "metrics.jsonl").exists() and metrics(out_dir)):
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline
        time.sleep(0.2)
    return proc


def test_second_job_on_a_run_directory_is_refused_and_a_killed_one_leaves_no_stale_lock(corpus_dir, spm_path, tmp_path):
    out = tmp_path / "run"
    slow = small_run(corpus_dir, spm_path, out, "--train.max_steps=100000", "--train.save_every=0",
                     "--train.eval_every=0", "--train.resume=auto")
    first = start_trainer(slow, out)
    try:
        with pytest.raises(RunDirError, match=rf"run directory .* is in use by another job \(host .*, pid {first.pid},"):
            train.main(small_run(corpus_dir, spm_path, out, "--train.resume=auto"))
        before = metrics(out)
    finally:
        first.send_signal(signal.SIGKILL)        # a hard kill before its first checkpoint
        first.wait(timeout=30)
    assert not complete_checkpoints(out) and before
    # the kernel released the lock with the process; no checkpoint -> auto starts fresh, old metrics kept aside
    assert train.main(small_run(corpus_dir, spm_path, out, "--train.resume=auto", "--train.max_steps=2")) == 0
    stale = list(out.glob("metrics.stale-*.jsonl"))
    assert len(stale) == 1 and stale[0].read_text().splitlines()[0] == json.dumps(before[0])
    assert [s for s, _ in losses(out)] == [1, 2]


def test_resume_after_a_crash_keeps_one_curve(corpus_dir, spm_path, tmp_path):
    """Metrics logged after the last checkpoint are dropped on resume, so the curve equals an uninterrupted one."""
    full, crashed = tmp_path / "full", tmp_path / "crashed"
    assert train.main(small_run(corpus_dir, spm_path, full)) == 0
    assert train.main(small_run(corpus_dir, spm_path, crashed, "--train.stop_at_step=7", "--train.save_every=4")) == 0
    import shutil
    shutil.rmtree(complete_checkpoints(crashed)[-1])      # the job died after logging step 7, last save at 4
    assert max(s for s, _ in losses(crashed)) == 7
    assert train.main(small_run(corpus_dir, spm_path, crashed, "--train.resume=auto")) == 0
    assert losses(crashed) == losses(full)                 # steps 1..8 once each, same values


def test_resume_refuses_what_the_state_cannot_honour(corpus_dir, spm_path, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["--optim.name=rgp", "--optim.rank=8", "--optim.update_proj_gap=3"]
    assert train.main(small_run(corpus_dir, spm_path, out, *args, "--train.stop_at_step=4")) == 0
    for change, key in [("--optim.rank=16", "optim.rank"), ("--optim.name=galore", "optim.name"),
                        ("--model.dim=32", "model.dim"), ("--data.seq_len=32", "data.seq_len"),
                        ("--optim.proj_type=left", "optim.proj_type")]:
        with pytest.raises(RunDirError, match=rf"cannot resume with {key}=.*: the checkpoint was trained with {key}="):
            train.main(small_run(corpus_dir, spm_path, out, *args, "--train.resume=auto", change))
    capsys.readouterr()
    assert train.main(small_run(corpus_dir, spm_path, out, *args, "--train.resume=auto", "--optim.lr=0.002",
                                "--train.max_steps=10")) == 0
    printed = capsys.readouterr().out
    assert "changed settings: optim.lr 0.001 -> 0.002; train.max_steps 8 -> 10" in printed
    assert [s for s, _ in losses(out)] == list(range(1, 11))


def test_resume_changes_and_metrics_rules(tmp_path):
    saved = {"optim": {"name": "rgp", "rank": 8, "lr": 1e-3}, "train": {"resume": "none", "max_steps": 8}}
    now = {"optim": {"name": "rgp", "rank": 8, "lr": 2e-3}, "train": {"resume": "auto", "max_steps": 8}}
    assert resume_changes(saved, now) == ["optim.lr 0.001 -> 0.002"]
    with pytest.raises(RunDirError, match="optim.rank=16"):
        resume_changes(saved, {**now, "optim": {**now["optim"], "rank": 16}})
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s}) + "\n" for s in (1, 2, 3, 4)) + '{"step": 5, "lo')
    assert "dropped 2" in start_metrics(tmp_path, 3)       # steps 4 and the torn line of 5
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2, 3]
    assert start_metrics(tmp_path, 3) is None
    assert "moved the old metrics aside" in start_metrics(tmp_path, None) and not path.exists()


def test_weights_are_identical_whoever_resumes(corpus_dir, spm_path, tmp_path):
    """A resume after a dropped metrics tail still gives the uninterrupted run's weights bit for bit."""
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert train.main(small_run(corpus_dir, spm_path, full, "--train.eval_every=0")) == 0
    assert train.main(small_run(corpus_dir, spm_path, cut, "--train.eval_every=0", "--train.stop_at_step=6")) == 0
    import shutil
    shutil.rmtree(complete_checkpoints(cut)[-1])
    assert train.main(small_run(corpus_dir, spm_path, cut, "--train.eval_every=0", "--train.resume=auto")) == 0
    a = torch.load(complete_checkpoints(full)[-1] / "model.pt", weights_only=True)
    b = torch.load(complete_checkpoints(cut)[-1] / "model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
