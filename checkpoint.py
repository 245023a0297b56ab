"""Checkpoints: one step-numbered directory each, written atomically by all ranks.

    RUN/checkpoints/step_00000100/
        meta.json              step, tokens, elapsed time, resolved config, model args, world size (written last)
        model.pt               model state_dict (rank 0)
        optim_rank00000.pt ... each rank's owned optimizer state, + optim_manifest.json (optim/sharded.py)
        data_stream000.pt ...  the position of every data stream (written by the rank that reads it)
        rng_rank00000.pt ...   each rank's torch RNG states

Every rank writes into `step_XXXXXXXX.tmp/`; after a barrier rank 0 writes meta.json and renames the
directory, so a crash mid-write leaves only a `.tmp` directory and never damages the last good
checkpoint. Every file and the directory are fsynced before that rename, and the parent after it, so a
power loss cannot publish a step whose files are not on the disk yet. The names are in checkpoint_files.py. A directory is complete when it has no `.tmp` suffix and holds meta.json. Data streams are
per stream (not per rank) and optimizer state is per parameter name, so a checkpoint resumes on any
world size that divides data.num_streams.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

import checkpoint_files
from optim.sharded import load_optimizer_shards, save_optimizer_shards


class CheckpointError(RuntimeError):
    """A missing, incomplete or corrupt checkpoint; the message is one line that names the fix."""


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def complete_checkpoints(out_dir: str | Path) -> list[Path]:
    """Complete checkpoint directories of a run, oldest first."""
    root = Path(out_dir) / checkpoint_files.CHECKPOINTS
    if not root.is_dir():
        return []
    step_dir = checkpoint_files.STEP_DIR
    found = [p for p in root.iterdir() if step_dir.match(p.name) and (p / checkpoint_files.META).is_file()]
    return sorted(found, key=lambda p: int(step_dir.match(p.name).group(1)))


def resolve_resume(resume: str, out_dir: str | Path) -> Path | None:
    """`none` -> None, `auto` -> newest complete checkpoint of out_dir (None if there is none), else a path."""
    if resume == "none":
        return None
    if resume == "auto":
        found = complete_checkpoints(out_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / checkpoint_files.META).is_file():
        raise CheckpointError(f"--train.resume={resume!r} is not a complete checkpoint (no {checkpoint_files.META}); "
                              f"pass a step_* directory under RUN/checkpoints or --train.resume=auto")
    return path


def _load(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file {str(path)!r} is missing; resume from another step_* "
                              f"directory with --train.resume=PATH") from None
    except Exception as e:
        raise CheckpointError(f"checkpoint file {str(path)!r} is corrupt or truncated ({type(e).__name__}); "
                              f"resume from an earlier step_* directory with --train.resume=PATH") from None


def read_meta(ckpt: Path) -> dict:
    try:
        return json.loads((Path(ckpt) / checkpoint_files.META).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{Path(ckpt) / checkpoint_files.META} is unreadable ({type(e).__name__}); "
                              f"resume from another step_* directory with --train.resume=PATH") from None


def save_checkpoint(out_dir: str | Path, step: int, meta: dict, model, optimizer, batches,
                    rank: int, keep_last: int = 0) -> Path:
    """Collective: every rank calls it at the same step."""
    root = Path(out_dir) / checkpoint_files.CHECKPOINTS
    final = root / checkpoint_files.step_dir(step)
    tmp = root / checkpoint_files.tmp_step_dir(step)
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # a stale half-written attempt at this step
        tmp.mkdir(parents=True)
    _barrier()
    # Every file is fsynced as it is written (checkpoint_files.write_*), and the directory after them: the
    # rename below publishes the step, so everything it publishes must be on the disk before it is.
    if rank == 0:
        checkpoint_files.write_torch(tmp / checkpoint_files.MODEL, model.state_dict())
    save_optimizer_shards(optimizer, tmp)
    for s, state in batches.state_dicts().items():
        checkpoint_files.write_torch(tmp / checkpoint_files.data_stream_file(s), state)
    checkpoint_files.write_torch(tmp / checkpoint_files.rng_file(rank), {
        "cpu": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else torch.empty(0, dtype=torch.uint8)})
    checkpoint_files.fsync(tmp)
    _barrier()
    if rank == 0:
        checkpoint_files.write_text(tmp / checkpoint_files.META, json.dumps(meta, indent=1))
        checkpoint_files.fsync(tmp)
        if final.exists():  # re-saving a step after a resume from an earlier one
            shutil.rmtree(final)
        os.rename(tmp, final)
        for d in (root, root.parent):  # the rename itself, and checkpoints/ in the run dir (new at the first save)
            checkpoint_files.fsync(d)
        if keep_last > 0:
            for old in complete_checkpoints(out_dir)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def load_checkpoint(ckpt: Path, model, optimizer, batches, rank: int, num_streams: int) -> dict:
    """Restore everything this rank needs; checks completeness before touching any state."""
    ckpt = Path(ckpt)
    meta = read_meta(ckpt)
    names = [checkpoint_files.MODEL] + [checkpoint_files.data_stream_file(s) for s in range(num_streams)]
    missing = [name for name in names if not (ckpt / name).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {ckpt} lacks {missing[0]}"
                              f"{f' and {len(missing) - 1} more files' if len(missing) > 1 else ''}; "
                              f"resume from another step_* directory with --train.resume=PATH")
    state = _load(ckpt / checkpoint_files.MODEL)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {ckpt} holds a different model ({str(e).splitlines()[0]}); "
                              f"resume with the run's own --model.* settings (see {ckpt / checkpoint_files.META})") from None
    load_optimizer_shards(optimizer, ckpt)
    batches.load_state_dicts({s: _load(ckpt / checkpoint_files.data_stream_file(s)) for s in batches.streams})
    rng_file = ckpt / checkpoint_files.rng_file(rank)
    if rng_file.is_file():  # absent when resuming on more ranks than the checkpoint had: nothing random is used
        rng = _load(rng_file)
        torch.set_rng_state(rng["cpu"])
        if torch.cuda.is_available() and rng["cuda"].numel():
            torch.cuda.set_rng_state(rng["cuda"])
    return meta
