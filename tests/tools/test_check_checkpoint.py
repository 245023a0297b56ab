"""tools/check_checkpoint.py on a real checkpoint from a 2-step in-process training run, intact and damaged."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import small_run
from tools.check_checkpoint import check_checkpoint, main

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def run_dir(corpus_dir, spm_path, tmp_path_factory):
    import train
    out = tmp_path_factory.mktemp("ckpt") / "run"
    args = small_run(corpus_dir, spm_path, out, "--optim.name=rgp", "--optim.rank=8", "--train.max_steps=2",
                     "--train.save_every=1", "--train.eval_every=0")
    assert train.main(args) == 0
    return out


@pytest.fixture
def ckpt(run_dir, tmp_path):
    """A private copy of the newest checkpoint, free to damage."""
    dst = tmp_path / "step_00000002"
    shutil.copytree(run_dir / "checkpoints" / "step_00000002", dst)
    return dst


def failures(path) -> list[str]:
    return [f"{name}: {detail}" for ok, name, detail in check_checkpoint(path) if not ok]


def test_intact_checkpoint_passes(ckpt, capsys):
    assert failures(ckpt) == []
    assert main([str(ckpt)]) == 0
    out = capsys.readouterr().out
    assert "FAIL" not in out and "ok   model.pt" in out and "ok   optimizer" in out


def test_run_dir_checks_every_checkpoint(run_dir, capsys):
    assert main([str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "step_00000001:" in out and "step_00000002:" in out
    assert f"newest good checkpoint: {run_dir / 'checkpoints' / 'step_00000002'}" in out


def test_truncated_model_fails(ckpt, capsys):
    data = (ckpt / "model.pt").read_bytes()
    (ckpt / "model.pt").write_bytes(data[: len(data) // 2])
    fails = failures(ckpt)
    assert len(fails) == 1 and fails[0].startswith("model.pt: model.pt does not load")
    assert main([str(ckpt)]) == 1
    assert "FAIL model.pt" in capsys.readouterr().out


def test_missing_optimizer_rank_file_fails(ckpt):
    (ckpt / "optim_rank00000.pt").unlink()
    assert failures(ckpt) == ["optimizer: optim_rank00000.pt is missing"]


def test_missing_data_stream_fails(ckpt):
    (ckpt / "data_stream003.pt").unlink()
    assert failures(ckpt) == ["data streams: data_stream003.pt is missing"]


def test_damaged_newest_reports_older_good_one(run_dir, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    (run / "checkpoints" / "step_00000002" / "data_stream000.pt").unlink()
    assert main([str(run)]) == 1
    out = capsys.readouterr().out
    assert f"newest good checkpoint: {run / 'checkpoints' / 'step_00000001'}" in out
    assert "FAIL data streams: data_stream000.pt is missing" in out


def test_cli_runs_from_repo_root(ckpt):
    r = subprocess.run([sys.executable, "tools/check_checkpoint.py", str(ckpt)], cwd=REPO,
                       capture_output=True, text=True)
    assert r.returncode == 0 and "FAIL" not in r.stdout


def test_compare_reads_the_real_run(run_dir, tmp_path):
    """tools/compare.py on the trainer's own metrics.jsonl / config.toml (the format the synthetic runs mimic)."""
    from tools.compare import compare, summarize
    from tools.runs import read_metrics
    s = summarize(read_metrics(run_dir))
    assert s["last_step"] == 2 and s["tokens"] == 2 * 8 * 64 and s["optim_state_bytes"] > 0
    table, png = compare([run_dir], out=tmp_path / "real.png")
    assert png.is_file() and table.splitlines()[2].startswith("| run | - | - | 1.02k |")  # one run: dir name; no eval


def split_into_two_ranks(ckpt: Path, move: list[str]) -> None:
    """Rewrite a 1-rank optimizer checkpoint as 2 rank files (as a 2-rank run writes them): `move` goes to rank 1."""
    import json

    import torch
    sd = torch.load(ckpt / "optim_rank00000.pt", weights_only=True)
    manifest = json.loads((ckpt / "optim_manifest.json").read_text())
    plan = {n: (1 if n in move else 0) for n in manifest["plan"]}

    def part(rank):
        return {**sd, "rank": rank, "world_size": 2, "plan": plan,
                "state": {n: v for n, v in sd["state"].items() if plan[n] == rank},
                "param_groups": [{**g, "params": [n for n in g["params"] if plan[n] == rank]}
                                 for g in sd["param_groups"]]}
    torch.save(part(0), ckpt / "optim_rank00000.pt")
    torch.save(part(1), ckpt / "optim_rank00001.pt")
    manifest.update(world_size=2, plan=plan, files=["optim_rank00000.pt", "optim_rank00001.pt"])
    (ckpt / "optim_manifest.json").write_text(json.dumps(manifest))


def test_two_rank_files_cover_each_parameter_once(ckpt):
    split_into_two_ranks(ckpt, ["lm_head.weight", "layers.0.mlp.up_proj.weight"])
    assert failures(ckpt) == []
    # the plan says rank 1 owns lm_head, but rank 0's file claims it as well
    import json
    manifest = json.loads((ckpt / "optim_manifest.json").read_text())
    manifest["plan"]["lm_head.weight"] = 0
    (ckpt / "optim_manifest.json").write_text(json.dumps(manifest))
    assert failures(ckpt) == ["optimizer: optim_rank00001.pt holds 'lm_head.weight', "
                              "which the manifest assigns to rank 0"]
    (ckpt / "optim_rank00001.pt").unlink()
    assert failures(ckpt) == ["optimizer: optim_rank00001.pt is missing"]
