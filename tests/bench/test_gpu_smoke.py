"""bench/gpu_smoke.py: skips itself without CUDA, saying why; its pipeline (every optimizer through torchrun with
the collectives forced at world size 1, and rgp under the deepspeed launcher) runs end to end on CPU."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: the script would run for real")
def test_skips_without_cuda_and_says_why():
    proc = subprocess.run([sys.executable, "bench/gpu_smoke.py"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    assert proc.stdout.startswith("gpu_smoke: skipped: no CUDA device") and "cuda.is_available() is False" in proc.stdout


@pytest.mark.slow
def test_cpu_check_runs_the_whole_pipeline(corpus_dir, spm_path, tmp_path):
    proc = subprocess.run([sys.executable, "bench/gpu_smoke.py", "--cpu-check", "--out", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    runs = {r["run"]: r for r in lines if "run" in r}
    assert proc.returncode == 0, [r.get("log_tail") for r in runs.values() if not r["ok"]]
    assert set(runs) == {"adamw", "adamw8bit", "galore", "galore8bit", "rgp", "rgp8bit", "rgp_deepspeed",
                         "rgp_lowrank_comm"}
    for r in runs.values():
        assert r["ok"] and r["steps"] == 2 and r["tokens_per_s"] > 0 and r["estimated_peak_bytes"] > 0
    # the same rgp run through torchrun and through the deepspeed launcher (reduce-to-owner) trains alike
    assert abs(runs["rgp"]["loss"] - runs["rgp_deepspeed"]["loss"]) < 1e-4
    assert abs(runs["rgp"]["loss"] - runs["rgp_lowrank_comm"]["loss"]) < 1e-4
