"""Read a run directory (docs/design.md §1: config.toml, metrics.jsonl, checkpoints/, plots/) for the tools.

    from tools.runs import read_metrics, read_config, is_run_dir
    records = read_metrics("runs/tiny_rgp")     # deduplicated, in step order
    cfg = read_config("runs/tiny_rgp")          # the resolved config as a nested dict

metrics.jsonl is appended by the trainer (train.py, RunLog.log), one JSON object per line:
    train records: step, tokens, loss, lr, [grad_norm], tokens_per_s, elapsed_s, peak_mem_bytes, optim_state_bytes
    eval records:  step, tokens, eval_loss, eval_ppl, elapsed_s
    skipped steps: step, skipped_nonfinite, loss
Two facts make naive reading wrong: a run still in progress may have a half-written last line, and a run
resumed from checkpoint step S after a crash at step C > S logs steps S+1..C a second time. The second copy
is the one the surviving run continues from, so the last record per (step, kind) wins.
"""
from __future__ import annotations

import json
import tomllib
from pathlib import Path


class RunDirError(ValueError):
    """A path that is not a readable run directory; the message is one line."""


def is_run_dir(path: str | Path) -> bool:
    return (Path(path) / "metrics.jsonl").is_file()


def require_run_dir(path: str | Path) -> Path:
    path = Path(path)
    if not is_run_dir(path):
        raise RunDirError(f"{path} is not a run directory (no metrics.jsonl)")
    return path


def record_kind(record: dict) -> str | None:
    """'eval' (has eval_loss), 'train' (has loss), or None for anything else."""
    if "eval_loss" in record:
        return "eval"
    if "loss" in record:
        return "train"
    return None


def parse_lines(lines) -> list[dict]:
    """JSON objects of the lines; unparsable lines (a partially written tail) are skipped."""
    out = []
    for line in lines:
        line = line.strip()
        if not line:
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # the trainer is mid-write (or was killed mid-write); the rest of the file is fine
        if isinstance(rec, dict) and "step" in rec:
            out.append(rec)
    return out


def dedupe(records: list[dict]) -> list[dict]:
    """Keep the last record per (step, kind), sorted by (step, kind order train < eval)."""
    last: dict[tuple[int, str], dict] = {}
    for rec in records:
        kind = record_kind(rec)
        if kind is not None:
            last[(int(rec["step"]), kind)] = rec  # later lines overwrite: the resumed run's values
    order = {"train": 0, "eval": 1}
    return [last[k] for k in sorted(last, key=lambda k: (k[0], order[k[1]]))]


def read_metrics(run_dir: str | Path) -> list[dict]:
    """Deduplicated metrics of a run (see the module docstring), oldest step first."""
    path = require_run_dir(run_dir) / "metrics.jsonl"
    with open(path, encoding="utf-8", errors="replace") as f:
        return dedupe(parse_lines(f))


def train_records(records: list[dict]) -> list[dict]:
    return [r for r in records if record_kind(r) == "train"]


def eval_records(records: list[dict]) -> list[dict]:
    return [r for r in records if record_kind(r) == "eval"]


def read_config(run_dir: str | Path) -> dict:
    """The run's resolved config.toml as a nested dict ({} when the file is missing)."""
    path = Path(run_dir) / "config.toml"
    if not path.is_file():
        return {}
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise RunDirError(f"{path} is not valid TOML: {e}") from None


def human_bytes(n: float | None) -> str:
    """1536 -> '1.50 KiB'; None -> '-'."""
    if n is None:
        return "-"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"
