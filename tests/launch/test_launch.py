"""The launch scripts, run the way the README writes them (CPU, gloo, 2 processes, the tiny recipe).

Each README command is read from README.md itself and run with one extra override, `--train.out_dir`, so a
test never writes into runs/. The SLURM script runs under stand-ins for `srun` and `scontrol` (on PATH) that
do what SLURM does for one node: run the step's command, and record a requeue.
"""
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from checkpoint import complete_checkpoints
from tests.helpers import free_port

REPO = Path(__file__).resolve().parents[2]


def readme_command(script: str) -> str:
    """The README's CPU command line that runs launch/<script>."""
    lines = [ln.strip() for ln in (REPO / "README.md").read_text().splitlines()
             if f"bash launch/{script}" in ln and "tiny_cpu.toml" in ln]
    assert len(lines) == 1, f"README should show one CPU command for launch/{script}: {lines}"
    return lines[0]


def env(**extra):
    return {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": str(free_port()), **extra}


def metrics(out_dir):
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("script", ["torchrun.sh", "deepspeed.sh"])
def test_readme_launch_commands_train(corpus_dir, spm_path, tmp_path, script):
    out = tmp_path / "run"
    cmd = f"{readme_command(script)} --train.out_dir={out}"
    proc = subprocess.run(["bash", "-c", cmd], cwd=REPO, env=env(), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    steps = [r["step"] for r in metrics(out) if "loss" in r and "eval_loss" not in r]
    assert steps[-1] == 2 and "eval_ppl" in metrics(out)[-1]
    assert [c.name for c in complete_checkpoints(out)] == ["step_00000002"]
    assert "world 2" in proc.stdout


@pytest.mark.parametrize("args,message", [([], "name a recipe"), (["configs/runs/nope.toml"], "not found")])
def test_launch_script_without_a_recipe_is_one_line(args, message):
    proc = subprocess.run(["bash", "launch/torchrun.sh", *args], cwd=REPO, env=env(CONFIG=""),
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


FAKE_SRUN = """#!/usr/bin/env bash
# srun for one node: drop srun's own options, run the step's command (its processes get SLURM's signals)
while [[ "$1" == --* ]]; do shift; done
exec "$@"
"""
FAKE_SCONTROL = """#!/usr/bin/env bash
case "$1 $2" in
  "show hostnames") echo 127.0.0.1 ;;
  requeue*) echo "requeue $2" >> "$FAKE_SLURM_LOG" ;;
  *) echo "fake scontrol: $*" >&2; exit 1 ;;
esac
"""


@pytest.mark.slow
def test_slurm_preemption_requeues(corpus_dir, spm_path, tmp_path):
    """USR1 to the job step's processes (what --signal=USR1@120 does): the workers checkpoint, the script
    sees the trainer's marker and requeues, although torchrun's own exit code says nothing useful."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in [("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)]:
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    out, log = tmp_path / "run", tmp_path / "slurm.log"
    slurm = dict(SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="node0", SLURM_NNODES="1", SLURM_GPUS_ON_NODE="2",
                 SLURM_SUBMIT_DIR=str(REPO), FAKE_SLURM_LOG=str(log), PREEMPT_MARKER=str(tmp_path / "marker"),
                 PATH=f"{bin_dir}:{os.environ['PATH']}")
    cmd = ["bash", "launch/slurm.sbatch", "configs/runs/tiny_cpu.toml", "--train.micro_batch=4",
           "--train.max_steps=400", "--train.eval_every=0", "--train.save_every=0", "--log.log_every=1",
           f"--train.out_dir={out}"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env(**slurm), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        deadline = time.time() + 240
        while not ((out / "metrics.jsonl").exists() and metrics(out)):
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            assert time.time() < deadline, "training never started"
            time.sleep(0.5)
        step = psutil.Process(proc.pid).children()            # the "job step": srun's command and below
        for p in step:
            for q in [p, *p.children(recursive=True)]:
                q.send_signal(signal.SIGUSR1)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, output[-3000:]
    assert log.read_text().split() == ["requeue", "4242"], output[-3000:]
    assert "requeueing job 4242" in output
    saved = complete_checkpoints(out)
    assert saved and int(saved[-1].name.split("_")[1]) < 400


@pytest.mark.parametrize("script,extra_env", [("torchrun.sh", {"NGPU": "3"}),
                                              ("deepspeed.sh", {"HOSTFILE": "HOSTS", "DS_ACCELERATOR": "cpu",
                                                                "DS_CONFIG": "configs/deepspeed/zero2_cpu.json"})])
def test_bad_config_is_one_line_before_any_worker_starts(tmp_path, script, extra_env):
    """A world size that cannot divide the data streams (3 ranks; a hostfile with 2 + 1 slots): the script's
    validation step prints train.py's one line and exits 2; no launcher starts, so no launcher traceback."""
    (tmp_path / "hosts").write_text("node0 slots=2\nnode1 slots=1\n")
    extra_env = {k: v.replace("HOSTS", str(tmp_path / "hosts")) for k, v in extra_env.items()}
    proc = subprocess.run(["bash", f"launch/{script}", "configs/runs/tiny_cpu.toml", f"--train.out_dir={tmp_path}/r"],
                          cwd=REPO, env=env(**extra_env), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == ["error: world size 3 does not divide data.num_streams=8; use a world "
                                                "size that divides it or change --data.num_streams"]
    assert not (tmp_path / "r").exists()
