"""checkpoint.py on a tiny model, one process: file names from one place, durable writes, one-line errors."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import checkpoint_files
from checkpoint import complete_checkpoints, load_checkpoint, resolve_resume, save_checkpoint
from config import OptimConfig
from model.llama import Llama, LlamaArgs
from optim.sharded import ShardedOptimizer

ARGS = LlamaArgs(vocab_size=64, dim=16, n_layers=1, n_heads=2, intermediate_size=32, max_seq_len=8)
NUM_STREAMS = 2


class Streams:
    """What save/load_checkpoint use of data.c4.TrainBatches: the state of every stream this rank reads."""

    def __init__(self, step: int = 0):
        self.streams = {s: None for s in range(NUM_STREAMS)}
        self.step = step

    def state_dicts(self) -> dict:
        return {s: {"position": torch.tensor([self.step, s])} for s in self.streams}

    def load_state_dicts(self, states: dict) -> None:
        self.step = int(states[0]["position"][0])


def trained(seed: int = 0, steps: int = 1):
    """A tiny model and its (world size 1) sharded optimizer after `steps` steps, so the optimizer has state."""
    torch.manual_seed(seed)
    model = Llama(ARGS)
    opt = ShardedOptimizer(list(model.named_parameters()), OptimConfig(name="adamw", lr=1e-2))
    for _ in range(steps):
        x = torch.randint(0, ARGS.vocab_size, (2, ARGS.max_seq_len + 1))
        model(x[:, :-1], x[:, 1:])[1].backward()
        opt.sync_gradients()
        opt.step()
        opt.zero_grad()
    return model, opt


def meta_of(model, step: int) -> dict:
    return {"step": step, "tokens": 16 * step, "elapsed_s": 1.0, "world_size": 1,
            "model_args": {k: getattr(model.args, k) for k in vars(model.args)},
            "config": {"data": {"num_streams": NUM_STREAMS}}}


def save(out: Path, step: int, model, opt, **kw) -> Path:
    return save_checkpoint(out, step, meta_of(model, step), model, opt, Streams(step), rank=0, **kw)


def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ------------------------------------------------------------------------------------------ file names

def test_every_reader_and_writer_takes_the_names_from_checkpoint_files(tmp_path, monkeypatch):
    """Rename every file in checkpoint_files alone: the trainer's save and load, optim/sharded.py's shards,
    tools/check_checkpoint.py and tools/export_hf.py all follow, so no other module spells a name."""
    from tools.check_checkpoint import check_checkpoint
    from tools.export_hf import load_checkpoint as export_load, resolve_checkpoint
    monkeypatch.setattr(checkpoint_files, "META", "info.json")
    monkeypatch.setattr(checkpoint_files, "MODEL", "weights.bin")
    monkeypatch.setattr(checkpoint_files, "OPTIM_MANIFEST", "optimizer.json")
    monkeypatch.setattr(checkpoint_files, "optim_file", lambda r: f"optimizer-{r}.bin")
    monkeypatch.setattr(checkpoint_files, "data_stream_file", lambda s: f"stream-{s}.bin")
    monkeypatch.setattr(checkpoint_files, "rng_file", lambda r: f"rng-{r}.bin")
    model, opt = trained()
    final = save(tmp_path, 3, model, opt)
    assert sorted(p.name for p in final.iterdir()) == ["info.json", "optimizer-0.bin", "optimizer.json",
                                                       "rng-0.bin", "stream-0.bin", "stream-1.bin", "weights.bin"]
    assert complete_checkpoints(tmp_path) == [final] and resolve_resume("auto", tmp_path) == final
    assert all(ok for ok, _, _ in check_checkpoint(final)), check_checkpoint(final)
    assert resolve_checkpoint(tmp_path) == final and export_load(final)[0]["step"] == 3
    fresh, opt2 = trained(seed=1, steps=0)
    streams = Streams()
    assert load_checkpoint(final, fresh, opt2, streams, rank=0, num_streams=NUM_STREAMS)["step"] == 3
    assert same_weights(fresh, model) and streams.step == 3
    assert opt2.state_dict()["state"].keys() == opt.state_dict()["state"].keys()


def test_export_finds_the_checkpoint_resume_auto_finds(tmp_path):
    """tools/export_hf.py on a run dir (or its checkpoints/) takes the newest complete checkpoint, as
    --train.resume=auto does: a step_* dir without meta.json or a .tmp dir is not one."""
    from tools.export_hf import resolve_checkpoint
    model, opt = trained()
    save(tmp_path, 2, model, opt)
    newest = save(tmp_path, 5, model, opt)
    (tmp_path / "checkpoints" / "step_00000009").mkdir()              # being written by hand, no meta.json
    (tmp_path / "checkpoints" / "step_00000010.tmp").mkdir()
    assert resolve_checkpoint(tmp_path) == resolve_resume("auto", tmp_path) == newest
    assert resolve_checkpoint(tmp_path / "checkpoints") == newest


# ------------------------------------------------------------------------------------------ durability

def test_files_and_directories_are_synced_before_the_step_is_published(tmp_path, monkeypatch):
    """Every file of the step and the step directory are fsynced before the rename that publishes the step
    (else a power loss can leave a complete-looking checkpoint of empty files), the parent after it."""
    events = []                      # ("fsync", inode) / ("replace" | "rename", destination), in call order
    real_fsync, real_rename, real_replace = os.fsync, os.rename, os.replace

    def fsync(fd):
        events.append(("fsync", os.fstat(fd).st_ino))
        real_fsync(fd)

    def moved(kind, real):
        def move(src, dst):
            events.append((kind, Path(dst)))
            real(src, dst)
        return move
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", moved("rename", real_rename))
    monkeypatch.setattr(os, "replace", moved("replace", real_replace))
    model, opt = trained()
    final = save(tmp_path, 3, model, opt)
    publish = events.index(("rename", final))
    before, after = events[:publish], events[publish + 1:]
    synced = [ino for kind, ino in before if kind == "fsync"]
    files = sorted(final.iterdir())
    assert len(files) == 7
    unsynced = [f.name for f in files if f.stat().st_ino not in synced]
    assert not unsynced, f"not fsynced before the step was published: {unsynced}"
    # the directory (same inode after the rename) is synced after its last file was written or renamed into it
    dir_synced = max(i for i, e in enumerate(before) if e == ("fsync", final.stat().st_ino))
    last_file = max(i for i, (kind, x) in enumerate(before)
                    if kind == "replace" or (kind == "fsync" and x != final.stat().st_ino))
    assert dir_synced > last_file
    assert ("fsync", final.parent.stat().st_ino) in after
