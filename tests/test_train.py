"""End-to-end trainer tests on the local corpus with a very small LLaMA (CPU, seconds per run)."""
import json
import math
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train
from checkpoint import CheckpointError, complete_checkpoints
from config import ConfigError
from data.c4 import DataError
from tests.helpers import small_run

REPO = Path(__file__).resolve().parent.parent


def metrics(out_dir):
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


def final_weights(out_dir):
    last = complete_checkpoints(out_dir)[-1]
    return torch.load(last / "model.pt", weights_only=True)


@pytest.mark.parametrize("optim", ["adamw", "rgp"])
def test_resume_is_bit_identical(corpus_dir, spm_path, tmp_path, optim):
    """8 uninterrupted steps == 4 steps, stop, resume for 4 more: same losses, eval and weights, bit for bit."""
    extra = [f"--optim.name={optim}", "--optim.rank=8", "--optim.update_proj_gap=3"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert train.main(small_run(corpus_dir, spm_path, full, *extra)) == 0
    assert train.main(small_run(corpus_dir, spm_path, cut, *extra, "--train.stop_at_step=4")) == 0
    assert [c.name for c in complete_checkpoints(cut)] == ["step_00000004"]
    assert train.main(small_run(corpus_dir, spm_path, cut, *extra, "--train.resume=auto")) == 0

    def by_step(records, key):
        return {r["step"]: r[key] for r in records if key in r}

    full_m, cut_m = metrics(full), metrics(cut)
    assert by_step(full_m, "loss") == by_step(cut_m, "loss")
    assert by_step(full_m, "eval_loss") == by_step(cut_m, "eval_loss")
    a, b = final_weights(full), final_weights(cut)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_layerwise_equals_normal_step(corpus_dir, spm_path, tmp_path):
    """Stepping each parameter in its backward hook (grad_accum=2) gives the weights of a normal step."""
    extra = ["--optim.name=galore", "--optim.rank=8", "--optim.update_proj_gap=3", "--train.grad_clip=0",
             "--train.max_steps=4", "--train.eval_every=0"]
    assert train.main(small_run(corpus_dir, spm_path, tmp_path / "normal", *extra)) == 0
    assert train.main(small_run(corpus_dir, spm_path, tmp_path / "lw", *extra, "--optim.layerwise=true")) == 0
    a, b = final_weights(tmp_path / "normal"), final_weights(tmp_path / "lw")
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ConfigError, match="layerwise needs"):
        train.main(small_run(corpus_dir, spm_path, tmp_path / "x", "--optim.layerwise=true"))  # grad_clip 1.0


def test_metrics_and_checkpoint_contents(corpus_dir, spm_path, tmp_path):
    out = tmp_path / "run"
    assert train.main(small_run(corpus_dir, spm_path, out, "--train.keep_last=1")) == 0
    records = metrics(out)
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 9))
    for r in steps:
        assert {"step", "tokens", "loss", "lr", "tokens_per_s"} <= r.keys()
        assert r["tokens"] == r["step"] * 8 * 64
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [4, 8]
    assert all(math.isclose(r["eval_ppl"], math.exp(r["eval_loss"])) for r in evals)
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] < math.log(8192)  # it learns
    assert [c.name for c in complete_checkpoints(out)] == ["step_00000008"]  # keep_last=1
    meta = json.loads((complete_checkpoints(out)[-1] / "meta.json").read_text())
    assert meta["step"] == 8 and meta["config"]["optim"]["name"] == "adamw"
    assert (out / "config.toml").read_text().count("[optim]") == 1


def test_bad_inputs_give_one_line_errors(corpus_dir, spm_path, tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'optim.lr'"):
        train.main(small_run(corpus_dir, spm_path, tmp_path / "a", "--optim.lrr=0.1"))
    with pytest.raises(ConfigError, match="train.max_steps: expected int"):
        train.main(small_run(corpus_dir, spm_path, tmp_path / "a", "--train.max_steps=ten"))
    with pytest.raises(DataError, match="does not exist; fix the path"):
        train.main(small_run(tmp_path / "nowhere", spm_path, tmp_path / "b"))
    assert not (tmp_path / "nowhere").exists()              # a mistyped path never builds a stand-in corpus
    shards = tmp_path / "shards"
    shutil.copytree(corpus_dir, shards)
    (sorted(shards.glob("*train*.json.gz"))[3]).write_bytes(b"")
    with pytest.raises(DataError, match="is empty"):
        train.main(small_run(shards, spm_path, tmp_path / "c"))
    with pytest.raises(DataError, match="does not divide|not a multiple"):
        train.main(small_run(corpus_dir, spm_path, tmp_path / "d", "--train.micro_batch=3"))


def test_corrupt_checkpoint_is_refused_and_kept(corpus_dir, spm_path, tmp_path):
    out = tmp_path / "run"
    assert train.main(small_run(corpus_dir, spm_path, out)) == 0
    good, last = complete_checkpoints(out)
    data = (last / "model.pt").read_bytes()
    (last / "model.pt").write_bytes(data[: len(data) // 2])  # truncated on disk
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        train.main(small_run(corpus_dir, spm_path, out, "--train.resume=auto", "--train.max_steps=12"))
    assert (good / "model.pt").is_file() and (good / "meta.json").is_file()  # the earlier one is untouched
    assert train.main(small_run(corpus_dir, spm_path, out, f"--train.resume={good}", "--train.max_steps=12")) == 0
    # a run directory that already holds a run is never overwritten by a fresh start
    with pytest.raises(train.RunError, match="already holds a run"):
        train.main(small_run(corpus_dir, spm_path, out))


def test_cli_error_is_one_line(corpus_dir, spm_path, tmp_path):
    proc = subprocess.run([sys.executable, "train.py", *small_run(corpus_dir, spm_path, tmp_path / "x", "--optim.nme=rgp")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: unknown config key 'optim.nme'; did you mean 'optim.name'?"]


def test_sigterm_checkpoints_and_resume_matches(corpus_dir, spm_path, tmp_path):
    """SIGTERM mid-run: checkpoint at the next step boundary, exit 143; resuming reaches the same final loss
    and weights as an uninterrupted run."""
    args = ["--train.max_steps=40", "--train.eval_every=20", "--train.save_every=0", "--log.log_every=1"]
    assert train.main(small_run(corpus_dir, spm_path, tmp_path / "ref", *args)) == 0
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "train.py", *small_run(corpus_dir, spm_path, out, *args)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:  # the handlers are installed before this line is printed
        if "fresh start" in line:
            proc.send_signal(signal.SIGTERM)
            break
    rest = proc.communicate(timeout=120)[0]
    assert proc.returncode == train.PREEMPTED_EXIT, rest
    (ckpt,) = complete_checkpoints(out)
    stopped_at = json.loads((ckpt / "meta.json").read_text())["step"]
    assert 1 <= stopped_at < 40
    assert train.main(small_run(corpus_dir, spm_path, out, *args, "--train.resume=auto")) == 0
    ref, got = metrics(tmp_path / "ref"), metrics(out)
    final = lambda records: [r for r in records if r["step"] == 40 and "loss" in r][-1]["loss"]
    assert final(ref) == final(got)
    a, b = final_weights(tmp_path / "ref"), final_weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_nonfinite_loss_stops_or_skips(corpus_dir, spm_path, tmp_path, monkeypatch):
    """A NaN loss at step 6 stops the run with a clear error and leaves the step-4 checkpoint intact;
    with --train.skip_nonfinite the step is skipped and logged."""
    real_build = train.build_model

    def build_poisoned(*a, **k):
        model = real_build(*a, **k)
        forward, calls = model.forward, {"n": 0}

        def poisoned(idx, targets=None):
            logits, loss = forward(idx, targets)
            calls["n"] += 1
            if targets is not None and calls["n"] in (11, 12):  # both micro-batches of step 6
                loss = loss * float("nan")
            return logits, loss
        model.forward = poisoned
        return model

    monkeypatch.setattr(train, "build_model", build_poisoned)
    out = tmp_path / "nan"
    with pytest.raises(train.RunError, match="loss became nan at step 6"):
        train.main(small_run(corpus_dir, spm_path, out, "--train.eval_every=0"))
    assert [c.name for c in complete_checkpoints(out)] == ["step_00000004"]
    out2 = tmp_path / "skip"
    assert train.main(small_run(corpus_dir, spm_path, out2, "--train.eval_every=0", "--train.skip_nonfinite=true")) == 0
    skipped = [r for r in metrics(out2) if r.get("skipped_nonfinite")]
    assert [r["step"] for r in skipped] == [6]


@pytest.mark.parametrize("bad", [float("inf"), float("nan")], ids=["inf", "nan"])
def test_nonfinite_grad_norm_stops_or_skips(corpus_dir, spm_path, tmp_path, monkeypatch, bad):
    """A finite loss with one inf/NaN gradient at step 6: without the check, clipping by an inf norm zeroes
    every gradient (a NaN one poisons them) and training goes on. It must stop like a non-finite loss, keeping
    the step-4 checkpoint, or skip the step under --train.skip_nonfinite without touching the weights."""
    real_build = train.build_model

    def build_poisoned(*a, **k):
        model = real_build(*a, **k)
        calls = {"n": 0}

        def hook(grad):
            calls["n"] += 1
            return torch.full_like(grad, bad) if calls["n"] in (11, 12) else grad   # step 6's two micro-batches
        model.norm.weight.register_hook(hook)
        return model

    monkeypatch.setattr(train, "build_model", build_poisoned)
    out = tmp_path / "stop"
    with pytest.raises(train.RunError, match=f"gradient norm became {bad} at step 6"):
        train.main(small_run(corpus_dir, spm_path, out, "--train.eval_every=0"))
    assert [c.name for c in complete_checkpoints(out)] == ["step_00000004"]
    out2 = tmp_path / "skip"
    assert train.main(small_run(corpus_dir, spm_path, out2, "--train.eval_every=0", "--train.skip_nonfinite=true",
                                "--train.max_steps=6", "--train.save_every=5")) == 0
    assert [r["step"] for r in metrics(out2) if r.get("skipped_nonfinite")] == [6]
    step5, step6 = [torch.load(c / "model.pt", weights_only=True) for c in complete_checkpoints(out2)]
    assert all(torch.equal(step5[k], step6[k]) for k in step5)              # the skipped step moved nothing


def test_wandb_offline_keeps_one_run_across_resume(corpus_dir, spm_path, tmp_path, monkeypatch):
    """--log.wandb=true works with no network (offline) and a resumed run continues the same wandb run id."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "wb"
    args = ["--log.wandb=true", "--train.eval_every=0", "--train.max_steps=4"]
    assert train.main(small_run(corpus_dir, spm_path, out, *args, "--train.stop_at_step=2")) == 0
    run_id = (out / "wandb_id.txt").read_text().strip()
    assert train.main(small_run(corpus_dir, spm_path, out, *args, "--train.resume=auto")) == 0
    assert (out / "wandb_id.txt").read_text().strip() == run_id
    offline_runs = list((out / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(offline_runs) == 2  # one directory per process start, both under the same run id
    assert [r["step"] for r in metrics(out) if "loss" in r] == [1, 2, 3, 4]


def test_force_collectives_at_world_size_one_is_exact(corpus_dir, spm_path, tmp_path, monkeypatch):
    """--train.force_collectives runs the sharded optimizer's whole communication path (flags, gradient
    reduction, norms, weight broadcast) with one process - how bench/gpu_smoke.sh exercises NCCL on one GPU -
    and trains exactly like the pass-through."""
    import torch.distributed as dist
    calls = []
    for name in ("all_reduce", "broadcast", "reduce", "all_gather_single"):
        real = getattr(dist, name)
        monkeypatch.setattr(dist, name, lambda *a, _real=real, _name=name, **k: (calls.append(_name), _real(*a, **k))[1])
    extra = ["--optim.name=galore", "--optim.rank=8", "--optim.update_proj_gap=3", "--train.max_steps=4"]
    assert train.main(small_run(corpus_dir, spm_path, tmp_path / "plain", *extra)) == 0
    plain_calls = len(calls)
    assert train.main(small_run(corpus_dir, spm_path, tmp_path / "forced", *extra, "--train.force_collectives=true")) == 0
    assert not dist.is_initialized()                     # the trainer's own group is gone again
    # flags and norms, gradients to their owner, weights back (on gloo the rank-signature all-gather is broadcasts)
    assert {"all_reduce", "reduce", "broadcast"} <= set(calls[plain_calls:])
    a, b = final_weights(tmp_path / "plain"), final_weights(tmp_path / "forced")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in metrics(tmp_path / "plain") if "loss" in r] == \
        [r["loss"] for r in metrics(tmp_path / "forced") if "loss" in r]
