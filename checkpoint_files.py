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
"""
from __future__ import annotations

import re

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
