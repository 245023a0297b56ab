"""tools/sweep.py: a grid runs to a per-configuration table with mean and spread over seeds; a sweep killed
half-way continues with the same command to the same table; bad grid input is one line before any run."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import train
from checkpoint import complete_checkpoints
from tests.helpers import small_run
from tools.sweep import main as sweep

REPO = Path(__file__).resolve().parents[2]


def fixed_settings(corpus_dir, spm_path):
    """small_run's settings as --set items (the sweep supplies out_dir and resume)."""
    args = small_run(corpus_dir, spm_path, "unused", "--train.max_steps=4", "--train.eval_every=2",
                     "--train.save_every=2")
    pairs = [a[2:] for a in args[2:] if a.startswith("--") and "=" in a and not a.startswith("--train.out_dir")]
    return [x for p in pairs for x in ("--set", p)]


def grid():
    return ["--grid", "optim.lr=0.001,0.003", "--grid", "train.seed=0,1"]


def test_sweep_summarises_seeds_and_resumes_to_the_same_table(corpus_dir, spm_path, tmp_path, capsys):
    base = ["--config", str(REPO / "configs/runs/tiny_cpu.toml"), *fixed_settings(corpus_dir, spm_path), *grid()]
    full = tmp_path / "full"
    assert sweep([*base, "--out", str(full)]) == 0
    rows = json.loads((full / "summary.json").read_text())
    assert [r["config"] for r in rows] == ["optim.lr=0.001", "optim.lr=0.003"]
    assert all(r["n"] == 2 and r["final_eval_ppl_std"] is not None for r in rows)
    assert (full / "compare.png").is_file() and (full / "compare.md").is_file()
    # "killed" half-way: one run finished, one stopped after its first checkpoint, two never started
    cut = tmp_path / "cut"
    shutil.copytree(full / "optim.lr=0.001,train.seed=0", cut / "optim.lr=0.001,train.seed=0")
    runs = cut / "optim.lr=0.001,train.seed=1"
    args = ["--config", str(REPO / "configs/runs/tiny_cpu.toml"),
            *[a for pair in zip(base[2::2], base[3::2]) if pair[0] == "--set" for a in ["--" + pair[1]]],
            "--optim.lr=0.001", "--train.seed=1", f"--train.out_dir={runs}", "--train.stop_at_step=2"]
    assert train.main(args) == 0 and len(complete_checkpoints(runs)) == 1
    capsys.readouterr()
    assert sweep([*base, "--out", str(cut)]) == 0
    printed = capsys.readouterr().out
    assert "optim.lr=0.001,train.seed=0: finished, skipped" in printed
    strip = lambda rs: [{k: v for k, v in r.items() if k != "tokens_per_s_median"} for r in rs]  # noqa: E731
    assert strip(json.loads((cut / "summary.json").read_text())) == strip(rows)   # the same table (but timing)


def test_bad_grid_is_one_line_before_any_run(tmp_path):
    proc = subprocess.run([sys.executable, "tools/sweep.py", "--config", "configs/runs/tiny_cpu.toml", "--out",
                           str(tmp_path / "s"), "--grid", "optim.name=adamw,galor"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and not (tmp_path / "s").exists()
    assert proc.stderr.strip().splitlines() == ["error: unknown optimizer 'galor'; set optim.name to one of adamw, "
                                                "adamw8bit, galore, galore8bit, rgp, rgp8bit"]


def test_tied_grid_keys_vary_together():
    from tools.sweep import grid_runs, run_name
    combos = grid_runs([("train.seed", "0,1"), ("optim.name+optim.matrix_lr", "adamw:3e-3,rgp:1e-2")])
    assert [run_name(c) for c in combos] == [
        "train.seed=0,optim.name=adamw,optim.matrix_lr=3e-3", "train.seed=0,optim.name=rgp,optim.matrix_lr=1e-2",
        "train.seed=1,optim.name=adamw,optim.matrix_lr=3e-3", "train.seed=1,optim.name=rgp,optim.matrix_lr=1e-2"]
    assert grid_runs([("optim.lr", "1e-3,3e-3")]) == [[("optim.lr", "1e-3")], [("optim.lr", "3e-3")]]


def test_tied_grid_with_a_missing_value_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "tools/sweep.py", "--config", "configs/runs/tiny_cpu.toml", "--out",
                           str(tmp_path / "s"), "--grid", "optim.name+optim.matrix_lr=adamw:3e-3,rgp"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and not (tmp_path / "s").exists()
    assert proc.stderr.strip().splitlines() == [
        "error: grid optim.name+optim.matrix_lr=adamw:3e-3,rgp: 'rgp' needs 2 ':'-separated values, one per key of "
        "'optim.name+optim.matrix_lr'; e.g. --grid optim.name+optim.matrix_lr=adamw:3e-3,rgp:1e-2"]
