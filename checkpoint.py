"""Checkpoints: one step-numbered directory each, written atomically by all ranks.

    RUN/checkpoints/step_00000100/
        meta.json              step, tokens, elapsed time, resolved config, model args, world size (written last)
        model.pt               model state_dict (rank 0)
        optim_rank00000.pt ... each rank's owned optimizer state, + optim_manifest.json (optim/sharded.py)
        data_stream000.pt ...  the position of every data stream (written by the rank that reads it)
        rng_rank00000.pt ...   each rank's torch RNG states

Every rank writes into `step_XXXXXXXX.tmp/`; once every rank has written its files, rank 0 writes meta.json
and renames the directory, so a crash mid-write leaves only a `.tmp` directory and never damages the last
good checkpoint. Every file and the directory are fsynced before that rename, and the parent after it, so a
power loss cannot publish a step whose files are not on the disk yet. A directory is complete when it has no
`.tmp` suffix and holds meta.json. Data streams are per stream (not per rank) and optimizer state is per
parameter name, so a checkpoint resumes on any world size that divides data.num_streams. The names are
spelled in checkpoint_files.py.
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


def _attempt(write, *args) -> OSError | None:
    """Run one phase of a save; its OSError (disk full, a file-size limit, ...) is returned, not raised, so that
    every rank still reaches the collective that follows."""
    try:
        write(*args)
    except OSError as e:
        return e
    return None


def _check_all_wrote(error: OSError | None, device, out_dir: Path, tmp: Path, step: int, rank: int) -> None:
    """Collective: if any rank failed its phase, every rank raises a one-line CheckpointError (on the rank that
    failed it names the file) once rank 0 has removed the partial .tmp directory. Nothing published is touched:
    the previous checkpoint stays the newest complete one."""
    failed = error is not None
    if dist.is_available() and dist.is_initialized():
        flag = torch.tensor([int(failed)], device=device)   # the parameters' device: NCCL takes no CPU tensor
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        failed = bool(flag.item())
    if not failed:
        return
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    what = (f"could not write {error.filename or tmp} ({error.strerror or error})" if error is not None
            else "another rank could not write its files (its own error names the file)")
    found = complete_checkpoints(out_dir)
    previous = f"the previous checkpoint {found[-1]} is intact" if found else "no earlier checkpoint exists"
    raise CheckpointError(f"checkpoint of step {step} failed: {what}; {previous}; free disk space (or raise the "
                          f"file-size limit) and resume with --train.resume=auto")


def _write_rank_files(tmp: Path, model, batches, rank: int) -> None:
    if rank == 0:
        checkpoint_files.write_torch(tmp / checkpoint_files.MODEL, model.state_dict())
    for s, state in batches.state_dicts().items():
        checkpoint_files.write_torch(tmp / checkpoint_files.data_stream_file(s), state)
    checkpoint_files.write_torch(tmp / checkpoint_files.rng_file(rank), {
        "cpu": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else torch.empty(0, dtype=torch.uint8)})
    checkpoint_files.fsync(tmp)


def _publish(root: Path, tmp: Path, final: Path, meta: dict) -> None:
    checkpoint_files.write_text(tmp / checkpoint_files.META, json.dumps(meta, indent=1))
    checkpoint_files.fsync(tmp)
    if final.exists():  # re-saving a step after a resume from an earlier one
        shutil.rmtree(final)
    os.rename(tmp, final)
    for d in (root, root.parent):  # the rename itself, and checkpoints/ in the run dir (new at the first save)
        checkpoint_files.fsync(d)


def save_checkpoint(out_dir: str | Path, step: int, meta: dict, model, optimizer, batches,
                    rank: int, keep_last: int = 0) -> Path:
    """Collective: every rank calls it at the same step.

    Three phases, each closed by a collective check that every rank succeeded: rank 0 makes the .tmp directory;
    every rank writes its files; rank 0 writes meta.json and renames the directory. A failed write (disk full, a
    file-size limit) raises a one-line CheckpointError on every rank instead of a traceback on one and a hang
    on the others; the partial .tmp directory is removed and the previous checkpoint is left as it was.
    """
    optimizer.wait_for_weights()       # weights still arriving from their owners (async_weights) are saved whole
    out_dir = Path(out_dir)
    root = out_dir / checkpoint_files.CHECKPOINTS
    final = root / checkpoint_files.step_dir(step)
    tmp = root / checkpoint_files.tmp_step_dir(step)
    device = next(model.parameters()).device

    def prepare():
        shutil.rmtree(tmp, ignore_errors=True)  # a stale half-written attempt at this step
        tmp.mkdir(parents=True)
    _check_all_wrote(_attempt(prepare) if rank == 0 else None, device, out_dir, tmp, step, rank)
    # Every file is fsynced as it is written (checkpoint_files.write_*), and the directory after them: the
    # rename in _publish makes the step visible, so everything it publishes must be on the disk before it.
    # save_optimizer_shards goes first, and on every rank: it ends in a barrier that every rank must reach.
    error = _attempt(save_optimizer_shards, optimizer, tmp)
    if error is None:
        error = _attempt(_write_rank_files, tmp, model, batches, rank)
    _check_all_wrote(error, device, out_dir, tmp, step, rank)
    _check_all_wrote(_attempt(_publish, root, tmp, final, meta) if rank == 0 else None,
                     device, out_dir, tmp, step, rank)
    if rank == 0 and keep_last > 0:
        for old in complete_checkpoints(out_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(ckpt: Path, model, optimizer, batches, rank: int, num_streams: int) -> dict:
    """Restore everything this rank needs. The model and data files are checked before any state is touched;
    a missing optimizer file (which optim/sharded.py finds from its manifest) is the same one-line error."""
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
    try:
        load_optimizer_shards(optimizer, ckpt)
    except FileNotFoundError as e:   # optim/sharded.py names the missing optimizer file
        raise CheckpointError(f"checkpoint {ckpt} cannot be resumed: {e}; resume from another step_* directory "
                              f"with --train.resume=PATH") from None
    batches.load_state_dicts({s: _load(ckpt / checkpoint_files.data_stream_file(s)) for s in batches.streams})
    rng_file = ckpt / checkpoint_files.rng_file(rank)
    if rng_file.is_file():  # absent when resuming on more ranks than the checkpoint had: nothing random is used
        rng = _load(rng_file)
        torch.set_rng_state(rng["cpu"])
        if torch.cuda.is_available() and rng["cuda"].numel():
            torch.cuda.set_rng_state(rng["cuda"])
    return meta
