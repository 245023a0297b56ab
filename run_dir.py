"""A run directory has one owner at a time, one metrics curve, and resumes only what its checkpoint can honour.

    with run_dir_lock(out_dir):          # rank 0; a second job on the same directory gets one line naming the holder
        start_metrics(out_dir, resume_step)            # drop the records a crash left after the checkpoint
        changes = resume_changes(saved_cfg, cfg)       # refuse what the saved state cannot honour

The rules (docs/design.md §1):
- Lock: `fcntl.flock` on RUN/.lock, held open by rank 0 for the whole job. The kernel drops it when the process
  dies (kill -9 included), so a crashed job never leaves it stuck; the file names the holder for the message.
- Metrics: metrics.jsonl holds one curve. A run resumed from step S drops the records after S (the steps are
  trained again); a run started fresh over a directory whose metrics have no checkpoint (a job killed before its
  first save) moves the old file aside to metrics.stale-<time>.jsonl. Tools therefore never see two curves.
- Resume: model shape, tokenizer and data layout, and the optimizer's name, rank and projection side are baked
  into the checkpoint's state; changing them on resume is refused with one line naming the key. Everything else
  (steps, cadence, learning rate, clipping, ...) may change and is printed.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from pathlib import Path

from config import flatten

LOCK_NAME = ".lock"
METRICS = "metrics.jsonl"

# Keys whose change the saved state cannot honour (prefix "model." covers every model key).
FROZEN_ON_RESUME = ("model.", "data.path", "data.tokenizer", "data.seq_len", "data.num_streams",
                    "optim.name", "optim.rank", "optim.proj_type")
# Keys that say where and how to resume, not what is trained: never reported as changes.
IGNORED_ON_RESUME = ("train.resume", "train.stop_at_step", "train.out_dir")


class RunDirError(RuntimeError):
    """The run directory is in use, or a resume asks for what the checkpoint cannot give; one line."""


@contextlib.contextmanager
def run_dir_lock(out_dir: str | Path):
    """Hold RUN/.lock for the duration (exclusive, non-blocking); RunDirError naming the holder if taken."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    f = open(out_dir / LOCK_NAME, "a+")
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown process"
            raise RunDirError(f"run directory {out_dir} is in use by another job ({holder}); wait for it to end, "
                              f"or choose another --train.out_dir") from None
        f.seek(0)
        f.truncate()
        f.write(f"host {socket.gethostname()}, pid {os.getpid()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        f.flush()
        yield
    finally:
        f.close()                              # closing the descriptor releases the lock


def start_metrics(out_dir: str | Path, resume_step: int | None) -> str | None:
    """Make metrics.jsonl one curve before this job appends to it; returns a note for the log, or None."""
    path = Path(out_dir) / METRICS
    if not path.exists():
        return None
    if resume_step is None:                    # fresh start over metrics that no checkpoint backs
        stale = path.with_name(f"metrics.stale-{time.strftime('%Y%m%d-%H%M%S')}.jsonl")
        os.replace(path, stale)
        return f"no checkpoint to resume: moved the old metrics aside to {stale.name} and started fresh"
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:           # a line cut by a crash mid-write
            dropped += 1
            continue
        if record.get("step", 0) <= resume_step:
            kept.append(line)
        else:
            dropped += 1
    if not dropped:
        return None
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)
    return f"dropped {dropped} metrics records logged after step {resume_step} (they are trained again)"


def resume_changes(saved: dict, now: dict) -> list[str]:
    """Compare the checkpoint's resolved config with this run's (both `Config.to_dict()`); RunDirError for a
    change the saved state cannot honour, else the list of changes ("optim.lr 0.001 -> 0.002") to print."""
    a, b = flatten(saved), flatten(now)
    changes = []
    for key in sorted(set(a) | set(b)):
        if key in IGNORED_ON_RESUME or a.get(key) == b.get(key):
            continue
        if key.startswith(FROZEN_ON_RESUME):
            raise RunDirError(f"cannot resume with {key}={b.get(key)!r}: the checkpoint was trained with "
                              f"{key}={a.get(key)!r} and its state depends on it; resume with the same value, or "
                              f"start a new run in another --train.out_dir")
        changes.append(f"{key} {a.get(key)!r} -> {b.get(key)!r}")
    return changes
