"""checkpoint.py on a tiny model, one process: file names from one place, durable writes, one-line errors."""
from __future__ import annotations

import errno
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import checkpoint_files
from checkpoint import CheckpointError, complete_checkpoints, load_checkpoint, resolve_resume, save_checkpoint
from config import OptimConfig
from model.llama import Llama, LlamaArgs
from optim.sharded import ShardedOptimizer
from tests.helpers import free_port, small_run

REPO = Path(__file__).resolve().parent.parent

ARGS = LlamaArgs(vocab_size=64, dim=16, n_layers=1, n_heads=2, intermediate_size=32, max_seq_len=8)
NUM_STREAMS = 2


class Streams:
    """What save/load_checkpoint use of data.c4.TrainBatches: the state of every stream this rank reads."""

    def __init__(self, step: int = 0, rank: int = 0, world: int = 1):
        self.streams = {s: None for s in range(NUM_STREAMS) if s % world == rank}
        self.step = step

    def state_dicts(self) -> dict:
        return {s: {"position": torch.tensor([self.step, s])} for s in self.streams}

    def load_state_dicts(self, states: dict) -> None:
        self.step = int(states[min(self.streams)]["position"][0])


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


def save(out: Path, step: int, model, opt, rank: int = 0, world: int = 1) -> Path:
    return save_checkpoint(out, step, meta_of(model, step), model, opt, Streams(step, rank, world), rank=rank)


def contents(ckpt: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(ckpt.iterdir())}


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


# ------------------------------------------------------------------------------------------ one-line errors

def test_missing_optimizer_file_is_a_one_line_error(tmp_path):
    model, opt = trained()
    final = save(tmp_path, 3, model, opt)
    (final / checkpoint_files.optim_file(0)).unlink()
    fresh, opt2 = trained(seed=1, steps=0)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(final, fresh, opt2, Streams(), rank=0, num_streams=NUM_STREAMS)
    msg = str(err.value)
    assert len(msg.splitlines()) == 1
    assert str(final / checkpoint_files.optim_file(0)) in msg and "--train.resume=PATH" in msg


def test_corrupt_optimizer_file_is_a_one_line_error(tmp_path):
    model, opt = trained()
    final = save(tmp_path, 3, model, opt)
    shard = final / checkpoint_files.optim_file(0)
    shard.write_bytes(shard.read_bytes()[:100])                # truncated on disk
    fresh, opt2 = trained(seed=1, steps=0)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(final, fresh, opt2, Streams(), rank=0, num_streams=NUM_STREAMS)
    msg = str(err.value)
    assert len(msg.splitlines()) == 1 and "is corrupt or truncated" in msg and str(shard) in msg
    assert "--train.resume=PATH" in msg


def failing_torch_save(monkeypatch, call: int):
    """torch.save raises ENOSPC from its `call`-th call on (1-based), as on a disk that has just filled up."""
    real, calls = torch.save, []

    def save(obj, f, *a, **k):
        calls.append(1)
        if len(calls) >= call:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(obj, f, *a, **k)
    monkeypatch.setattr(torch, "save", save)


# torch.save calls of a 1-rank save: the optimizer shard, model.pt, the data streams, the RNG state; meta.json is text
@pytest.mark.parametrize("fails,name", [(1, "optim_rank00000.pt.tmp"), (2, "model.pt"), (5, "rng_rank00000.pt"),
                                        (None, "meta.json")])
def test_failed_write_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch, fails, name):
    model, opt = trained()
    good = save(tmp_path, 2, model, opt)
    before = contents(good)
    if fails is None:
        real = checkpoint_files.write_text

        def no_space_for_meta(path, text):
            if Path(path).name != checkpoint_files.META:
                return real(path, text)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        monkeypatch.setattr(checkpoint_files, "write_text", no_space_for_meta)
    else:
        failing_torch_save(monkeypatch, fails)
    with pytest.raises(CheckpointError) as err:
        save(tmp_path, 4, model, opt)
    msg = str(err.value)
    assert len(msg.splitlines()) == 1
    assert f"step_00000004.tmp/{name} (No space left on device)" in msg
    assert f"the previous checkpoint {good} is intact" in msg and "--train.resume=auto" in msg
    assert sorted(p.name for p in good.parent.iterdir()) == ["step_00000002"]   # no step 4, no .tmp left
    assert contents(good) == before and complete_checkpoints(tmp_path) == [good]


RANK_SCRIPT = """
import sys, torch, torch.distributed as dist
sys.path.insert(0, {repo!r})
from checkpoint import CheckpointError
from tests.test_checkpoint import failing_torch_save, save, trained
rank = int(sys.argv[1])
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:{port}", rank=rank, world_size=2)
model, opt = trained()
save({out!r}, 2, model, opt, rank, 2)
if rank == 1:
    import pytest
    failing_torch_save(pytest.MonkeyPatch(), 1)
try:
    save({out!r}, 4, model, opt, rank, 2)
    print("saved")
except CheckpointError as e:
    print("error:", e)
dist.barrier()
dist.destroy_process_group()
sys.stdout.flush()
import os
os._exit(0)   # as train.py after a multi-process error: gloo's teardown racing the peer's exit can abort
"""


def test_a_failed_write_on_one_rank_stops_every_rank_without_a_hang(tmp_path):
    """2 gloo ranks; rank 1's disk fills up mid-save: both ranks get a one-line error (rank 1's names its
    file), none waits forever in a barrier, and the previous checkpoint is the newest complete one."""
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT.format(repo=str(REPO), port=free_port(), out=str(tmp_path / "run")))
    procs = [subprocess.Popen([sys.executable, str(script), str(r)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=dict(os.environ, OMP_NUM_THREADS="1")) for r in range(2)]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        outs.append(out.strip().splitlines())
    assert outs[1] == [outs[1][0]] and "step_00000004.tmp/optim_rank00001.pt.tmp (No space left" in outs[1][0]
    assert outs[0] == [outs[0][0]] and "another rank could not write its files" in outs[0][0]
    assert all("step_00000002 is intact" in o[0] for o in outs)
    root = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step_00000002"]


@pytest.fixture(scope="module")
def run_at_step_4(corpus_dir, spm_path, tmp_path_factory):
    """A trainer run directory whose newest checkpoint is step 4 of 8."""
    import train
    out = tmp_path_factory.mktemp("run") / "run"
    assert train.main(small_run(corpus_dir, spm_path, out, "--train.stop_at_step=4", "--train.eval_every=0")) == 0
    return out


def resume_cli(corpus_dir, spm_path, out: Path, file_size_limit: int | None = None):
    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, resource.RLIM_INFINITY))
    return subprocess.run([sys.executable, "train.py", *small_run(corpus_dir, spm_path, out, "--train.resume=auto",
                                                                 "--train.eval_every=0")],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          preexec_fn=limit if file_size_limit else None)


def test_cli_missing_optimizer_file_exits_2_with_one_line(run_at_step_4, corpus_dir, spm_path, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(run_at_step_4, out)
    (out / "checkpoints" / "step_00000004" / "optim_rank00000.pt").unlink()
    proc = resume_cli(corpus_dir, spm_path, out)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: checkpoint") and "optim_rank00000.pt" in lines[0]
    assert "--train.resume=PATH" in lines[0]


def test_cli_checkpoint_past_the_file_size_limit_exits_2_and_keeps_the_previous(run_at_step_4, corpus_dir, spm_path,
                                                                                 tmp_path):
    """The resumed run trains to step 8, where its checkpoint hits a file-size limit (RLIMIT_FSIZE, as a full disk
    would): one line naming the file, exit 2, step 4 untouched and no step 8 or .tmp directory left."""
    out = tmp_path / "run"
    shutil.copytree(run_at_step_4, out)
    step4 = out / "checkpoints" / "step_00000004"
    before = contents(step4)
    proc = resume_cli(corpus_dir, spm_path, out, file_size_limit=len(before["model.pt"]) // 2)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: checkpoint of step 8 failed: could not write ")
    assert "(File too large)" in lines[0] and f"the previous checkpoint {step4} is intact" in lines[0]
    assert sorted(p.name for p in step4.parent.iterdir()) == ["step_00000004"] and contents(step4) == before
