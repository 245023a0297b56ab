"""config.py: --help documents every key; --validate checks a run in about a second without building it."""
import dataclasses
import subprocess
import sys
import time
from pathlib import Path

from config import Config, field_comments

REPO = Path(__file__).resolve().parent.parent


def test_help_lists_every_key_with_default_and_comment():
    proc = subprocess.run([sys.executable, "train.py", "--help"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stderr == ""
    cfg = Config()
    comments = field_comments()
    for section in dataclasses.fields(Config):
        if section.name == "deepspeed":
            continue
        for key in dataclasses.fields(getattr(cfg, section.name)):
            name = f"{section.name}.{key.name}"
            default = repr(getattr(getattr(cfg, section.name), key.name))
            line = next((ln for ln in proc.stdout.splitlines() if ln.strip().startswith(f"--{name}=")), None)
            assert line is not None, f"--help lacks {name}"
            assert f"--{name}={default}" in line and comments.get(name), (name, line)
            assert comments[name] in line
    assert "--deepspeed=PATH" in proc.stdout


def test_validate_is_fast_and_builds_nothing(tmp_path):
    t0 = time.time()
    ok = subprocess.run([sys.executable, "train.py", "--validate", "--config", "configs/runs/c4_llama_1b.toml",
                         f"--train.out_dir={tmp_path}/run"], cwd=REPO, capture_output=True, text=True, timeout=60,
                        env={"WORLD_SIZE": "8", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    assert ok.returncode == 0, ok.stderr
    assert time.time() - t0 < 10 and not (tmp_path / "run").exists()     # ~1-2 s on a quiet machine
    bad = subprocess.run([sys.executable, "train.py", "--validate", "--config", "configs/runs/c4_llama_1b.toml",
                          "--optim.rank=4096"], cwd=REPO, capture_output=True, text=True, timeout=60,
                         env={"WORLD_SIZE": "8", "PATH": "/usr/bin:/bin"})
    assert bad.returncode == 2
    assert bad.stderr.strip() == ("error: projection rank 4096 exceeds min(m, n) = 2048 for layers.0.self_attn.q_proj.weight "
                                  "(2048, 2048); set optim.rank <= 2048")
