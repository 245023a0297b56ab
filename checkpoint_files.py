"""The names of a run's checkpoint directories and files, spelled once (docs/design.md §7).

    RUN/checkpoints/                   CHECKPOINTS
        step_00000100/                 step_dir(100): complete (STEP_DIR); written as step_00000100.tmp/ first
            meta.json                  META, written last
            model.pt                   MODEL
            optim_rank00000.pt ...     optim_file(rank), and OPTIM_MANIFEST listing them (optim/sharded.py)
            data_stream000.pt ...      data_stream_file(stream)
            rng_rank00000.pt ...       rng_file(rank)

checkpoint.py writes and reads these, optim/sharded.py writes and reads the optimizer's files, and tools/
check and export them. A module of its own because checkpoint.py imports optim/sharded.py, which needs the
names too. Callers read the names from this module when they run (`checkpoint_files.MODEL`), never copies.

Both writers also write through `write_torch` / `write_text` / `fsync` here: every file is on the disk before
the rename that publishes its step (a power loss after the rename must not leave a "complete" checkpoint of
empty files), and a failed write is an OSError that names the file.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch

CHECKPOINTS = "checkpoints"
STEP_DIR = re.compile(r"^step_(\d{8})$")           # a published step directory (complete if it holds META)
TMP_STEP_DIR = re.compile(r"^step_(\d{8})\.tmp$")  # a step directory being written, or a crashed write
META = "meta.json"
MODEL = "model.pt"
OPTIM_MANIFEST = "optim_manifest.json"


def step_dir(step: int) -> str:
    return f"step_{step:08d}"


def tmp_step_dir(step: int) -> str:
    return f"step_{step:08d}.tmp"


def optim_file(rank: int) -> str:
    return f"optim_rank{rank:05d}.pt"


def data_stream_file(stream: int) -> str:
    return f"data_stream{stream:03d}.pt"


def rng_file(rank: int) -> str:
    return f"rng_rank{rank:05d}.pt"


# ------------------------------------------------------------------------------------------ durable writes

def fsync(path: str | Path) -> None:
    """Flush a file's data, or a directory's entries (files created or renamed in it), to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _KeepWriteError:
    """The file handed to torch.save. torch.save reports a failed write as a RuntimeError without its cause
    ("unexpected pos ..."); this keeps the OSError (no space left, file too large) to report instead."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data):
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self):
        self.f.flush()


def _write(path: Path, write_to) -> None:
    try:
        with open(path, "wb") as f:
            keep = _KeepWriteError(f)
            try:
                write_to(keep)
            except RuntimeError:
                if keep.error is None:
                    raise
                raise keep.error from None
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:   # a failed write() names no file: name it
        raise OSError(e.errno, e.strerror or str(e), str(path)) from None


def write_torch(path: str | Path, obj) -> None:
    """torch.save(obj) to path, fsynced; a failure is an OSError naming path."""
    _write(Path(path), lambda f: torch.save(obj, f))


def write_text(path: str | Path, text: str) -> None:
    """text (UTF-8) to path, fsynced; a failure is an OSError naming path."""
    _write(Path(path), lambda f: f.write(text.encode()))
