"""tools/compare.py and tools/runs.py on synthetic run directories (no training)."""
from __future__ import annotations

import json
import math
import struct
import subprocess
import sys
from pathlib import Path

import tomli_w

from tools.compare import compare, differing_keys, main, run_labels, summarize
from tools.runs import read_config, read_metrics

REPO = Path(__file__).resolve().parents[2]
MiB = 2**20


def base_config(name: str, lr: float, out_dir: str) -> dict:
    return {"model": {"size": "tiny", "vocab_size": 0},
            "optim": {"name": name, "lr": lr, "rank": 64},
            "train": {"micro_batch": 8, "max_steps": 4, "out_dir": out_dir, "resume": "none"},
            "log": {"progress": True}}


def train_rec(step, loss, tps, mem, state, tokens_per_step=1000):
    return {"step": step, "tokens": step * tokens_per_step, "loss": loss, "lr": 0.01, "tokens_per_s": tps,
            "elapsed_s": 10.0 * step, "peak_mem_bytes": mem, "optim_state_bytes": state}


def eval_rec(step, ppl, tokens_per_step=1000):
    return {"step": step, "tokens": step * tokens_per_step, "eval_loss": math.log(ppl), "eval_ppl": ppl,
            "elapsed_s": 10.0 * step + 1}


def make_run(root: Path, name: str, cfg: dict, lines: list[str]) -> Path:
    d = root / name
    d.mkdir(parents=True)
    (d / "config.toml").write_text(tomli_w.dumps(cfg))
    (d / "metrics.jsonl").write_text("".join(lines))
    return d


def jl(*recs) -> list[str]:
    return [json.dumps(r) + "\n" for r in recs]


def fake_runs(tmp_path: Path) -> list[Path]:
    # run a: crashed after step 3, resumed from the step-2 checkpoint -> steps 3 logged twice (second copy wins)
    a = jl(train_rec(1, 6.0, 100.0, 100 * MiB, 4 * MiB), train_rec(2, 5.0, 300.0, 120 * MiB, 4 * MiB),
           eval_rec(2, 150.0), train_rec(3, 9.9, 999.0, 999 * MiB, 4 * MiB), eval_rec(3, 999.0),
           # resume: step 3 again, then step 4
           train_rec(3, 4.5, 200.0, 110 * MiB, 4 * MiB), eval_rec(3, 90.0),
           train_rec(4, 4.0, 250.0, 130 * MiB, 4 * MiB), eval_rec(4, 95.0))
    # run b: still in progress, last line half written
    b = jl(train_rec(1, 6.5, 50.0, 60 * MiB, 3 * MiB), eval_rec(1, 400.0), train_rec(2, 5.5, 70.0, 64 * MiB, 3 * MiB),
           eval_rec(2, 200.0))
    b.append('{"step": 3, "tokens": 3000, "lo')
    # run c: same optimizer as b, different lr; no eval yet
    c = jl(train_rec(1, 7.0, 80.0, 2 * 2**30, 1536))
    return [make_run(tmp_path, "run_a", base_config("adamw", 0.001, str(tmp_path / "run_a")), a),
            make_run(tmp_path, "run_b", base_config("rgp", 0.01, str(tmp_path / "run_b")), b),
            make_run(tmp_path, "run_c", base_config("rgp", 0.001, str(tmp_path / "run_c")), c)]


def test_read_metrics_dedupes_and_skips_partial_line(tmp_path):
    a, b, _ = fake_runs(tmp_path)
    ra = read_metrics(a)
    assert [(r["step"], "eval_loss" in r) for r in ra] == [(1, False), (2, False), (2, True), (3, False), (3, True),
                                                           (4, False), (4, True)]
    step3 = [r for r in ra if r["step"] == 3]
    assert step3[0]["loss"] == 4.5 and step3[1]["eval_ppl"] == 90.0  # the resumed run's values
    assert [r["step"] for r in read_metrics(b)] == [1, 1, 2, 2]
    assert read_config(a)["optim"]["name"] == "adamw"


def test_labels_name_only_differing_keys(tmp_path):
    runs = fake_runs(tmp_path)
    cfgs = [read_config(r) for r in runs]
    assert differing_keys(cfgs) == ["optim.name", "optim.lr"]  # out_dir differs too, but is bookkeeping
    assert run_labels(runs, cfgs) == ["optim.name=adamw optim.lr=0.001", "optim.name=rgp optim.lr=0.01",
                                      "optim.name=rgp optim.lr=0.001"]
    # identical configs -> directory names
    assert run_labels(runs[:2], [cfgs[0], cfgs[0]]) == ["run_a", "run_b"]


def test_summary_values(tmp_path):
    a, _, _ = fake_runs(tmp_path)
    s = summarize(read_metrics(a))
    assert s == {"final_ppl": 95.0, "best_ppl": 90.0, "tokens": 4000, "wall_s": 41.0, "tokens_per_s": 225.0,
                 "peak_mem_bytes": 130 * MiB, "optim_state_bytes": 4 * MiB, "last_step": 4}


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_table_and_plot(tmp_path, capsys):
    runs = fake_runs(tmp_path)
    out, table_out = tmp_path / "out" / "cmp.png", tmp_path / "out" / "cmp.md"
    assert main([*map(str, runs), "--out", str(out), "--table-out", str(table_out)]) == 0
    expected = "\n".join([
        "| run | final eval ppl | best eval ppl | tokens | wall time | tokens/s | peak memory | optimizer state |",
        "|---|---|---|---|---|---|---|---|",
        "| optim.name=adamw optim.lr=0.001 | 95.00 | 90.00 | 4.00k | 41s | 225 | 130.00 MiB | 4.00 MiB |",
        "| optim.name=rgp optim.lr=0.01 | 200.00 | 200.00 | 2.00k | 21s | 60 | 64.00 MiB | 3.00 MiB |",
        "| optim.name=rgp optim.lr=0.001 | - | - | 1.00k | 10s | 80 | 2.00 GiB | 1.50 KiB |",
    ])
    assert capsys.readouterr().out.strip() == expected
    assert table_out.read_text().strip() == expected
    w, h = png_size(out)
    assert w > 500 and h > 300 and out.stat().st_size > 10_000
    for x in ("step", "time"):
        _, png = compare(runs, x=x, out=tmp_path / f"{x}.png")
        assert png_size(png)[0] > 500


def test_single_run_defaults_to_its_plots_dir(tmp_path):
    a = fake_runs(tmp_path)[0]
    _, png = compare([a])
    assert png == a / "plots" / "curves.png" and png.is_file()


def test_not_a_run_dir_is_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    r = subprocess.run([sys.executable, "tools/compare.py", str(tmp_path / "empty")], cwd=REPO,
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip() == f"error: {tmp_path / 'empty'} is not a run directory (no metrics.jsonl)"
