"""Bad input, as a demanding new user would type it: every case stops with one line naming the fix (exit 2
from `python train.py`), before anything is trained, and leaves no run behind.

    python tests/test_bad_inputs.py     # prints the table of cases and their messages (Markdown)
"""
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import train  # noqa: E402
from tests.helpers import small_run  # noqa: E402

G = ["--optim.name=galore", "--optim.rank=8"]
# (case id, extra arguments, a regex the one-line message must match); {tmp} is the test's temporary directory
CASES = [
    ("typo in a key", ["--optim.lrr=0.1"], r"unknown config key 'optim.lrr'; did you mean 'optim.lr'"),
    ("unknown section", ["--optimizer.lr=0.1"], r"unknown config section 'optimizer'.*did you mean 'optim'"),
    ("wrong type", ["--train.max_steps=ten"], r"train.max_steps: expected int, got 'ten'"),
    ("bad bool", ["--train.skip_nonfinite=maybe"], r"expected true/false"),
    ("positional argument", ["foo"], r"unexpected argument 'foo'; use --section.key=value"),
    ("flag without value", ["--train.max_steps"], r"--train.max_steps needs a value"),
    ("missing recipe", ["--config", "configs/runs/nope.toml"], r"config file .* not found"),
    ("broken recipe", ["--config", "{tmp}/broken.toml"], r"is not valid TOML"),
    ("unknown optimizer", ["--optim.name=galor"], r"unknown optimizer 'galor'; set optim.name to one of"),
    ("lr zero", ["--optim.lr=0"], r"optim.lr must be > 0, got 0.0"),
    ("lr negative", ["--optim.lr=-0.1"], r"optim.lr must be > 0"),
    ("beta1 = 1", ["--optim.beta1=1.0"], r"optim.beta1/beta2 must be in \[0, 1\)"),
    ("rank zero", [*G, "--optim.rank=0"], r"optim.rank must be >= 1"),
    ("rank above the matrices", [*G, "--optim.rank=1000"], r"projection rank 1000 exceeds min\(m, n\) = 64"),
    ("refresh gap zero", [*G, "--optim.update_proj_gap=0"], r"optim.update_proj_gap must be >= 1"),
    ("unknown projection side", [*G, "--optim.proj_type=diag"], r"unknown optim.proj_type 'diag'"),
    ("unknown moment rule", [*G, "--optim.moments_on_refresh=drop"], r"moments_on_refresh must be keep or project"),
    ("micro batch zero", ["--train.micro_batch=0"], r"train.micro_batch must be >= 1"),
    ("batch not a multiple of the streams", ["--train.micro_batch=3"], r"is not a multiple of data.num_streams=8"),
    ("global batch not a multiple", ["--train.global_batch=10"], r"train.global_batch=10 is not a multiple of "
                                                                  r"micro_batch x world size"),
    ("streams do not divide the batch", ["--data.num_streams=3"], r"not a multiple of data.num_streams=3"),
    ("negative eval cadence", ["--train.eval_every=-1"], r"train.eval_every must be >= 0"),
    ("log cadence zero", ["--log.log_every=0"], r"log.log_every must be >= 1"),
    ("warmup fraction 1.5", ["--train.warmup_frac=1.5"], r"train.warmup_frac must be in \[0, 1\)"),
    ("fp16", ["--train.dtype=fp16"], r"train.dtype must be auto, float32 or bfloat16"),
    ("unknown device", ["--train.device=tpu"], r"train.device must be auto, cpu or cuda"),
    ("unknown model size", ["--model.size=huge"], r"unknown model size 'huge'; choose one of"),
    ("mistyped data path", ["--data.path={tmp}/nowhere"], r"data.path '.*nowhere' does not exist; fix the path"),
    ("mistyped tokenizer", ["--data.tokenizer={tmp}/nowhere.model"], r"data.tokenizer '.*' does not exist"),
    ("corrupt tokenizer", ["--data.tokenizer={tmp}/corrupt.model"], r"tokenizer file .* is empty or corrupt"),
    ("empty tokenizer", ["--data.tokenizer={tmp}/empty.model"], r"tokenizer file .* is empty or corrupt"),
    ("out_dir is a file", ["--train.out_dir={tmp}/a_file"], r"train.out_dir '.*a_file' is an existing file"),
    ("resume from nowhere", ["--train.resume={tmp}/nowhere"], r"is not a complete checkpoint \(no meta.json\)"),
    ("sequence longer than the validation text", ["--data.seq_len=2000000", "--data.val_tokens=2048"],
     r"hold fewer than data.seq_len \+ 1 = 2000001 tokens; lower --data.seq_len"),
    ("validation budget too big", ["--data.val_tokens=1000000000"], r"fewer than 1000000000 tokens; lower --data.val_tokens"),
    ("deepspeed without a launcher", ["--deepspeed=configs/deepspeed/zero2_cpu.json"], r"--deepspeed needs a launcher"),
    ("layer-wise with clipping", ["--optim.layerwise=true"], r"optim.layerwise needs one process"),
    ("missing DeepSpeed JSON", ["--deepspeed={tmp}/nope.json"], r"DeepSpeed config '.*nope.json' not found"),
    ("DeepSpeed comm dtype contradicting the run", ["--deepspeed={tmp}/launched_commfp32.json",
                                                    "--optim.comm_dtype=bfloat16"],
     r"communication_data_type=float32 but the run has optim.comm_dtype=bfloat16"),
    ("DeepSpeed JSON contradicting the run", ["--deepspeed={tmp}/launched_accum1.json", "--train.global_batch=16"],
     r"DeepSpeed config sets gradient_accumulation_steps=1 but the run has train.grad_accum=4"),
]


def make_bad_files(d: Path) -> Path:
    """The files the cases name under {tmp}: a broken recipe, bad tokenizers, a file where a directory belongs,
    and DeepSpeed JSONs that contradict the run ("launched_": run as if under a launcher)."""
    (d / "broken.toml").write_text("[train\nmax_steps = 3\n")
    (d / "corrupt.model").write_bytes(b"this is not a sentencepiece model")
    (d / "empty.model").write_bytes(b"")
    (d / "a_file").write_text("")
    (d / "launched_accum1.json").write_text('{"gradient_accumulation_steps": 1, "zero_optimization": {"stage": 2}}')
    (d / "launched_commfp32.json").write_text('{"communication_data_type": "fp32", "zero_optimization": {"stage": 2}}')
    return d


@pytest.fixture
def workdir(tmp_path):
    return make_bad_files(tmp_path)


def run_case(extra, corpus_dir, spm_path, tmp):
    """The exception train.py's __main__ turns into `error: <message>` (exit 2), or None if it trained."""
    extra = [a.replace("{tmp}", str(tmp)) for a in extra]
    out = tmp / "run"
    args = small_run(corpus_dir, spm_path, out, "--train.max_steps=1")
    if extra and extra[0] == "--config":         # a recipe of its own instead of small_run's
        args = extra + ["--train.out_dir", str(out)]
    else:
        args += extra
    import os
    from unittest import mock
    launched = {"WORLD_SIZE": "1"} if any("launched_" in a for a in extra) else {}   # as under a launcher
    try:
        with mock.patch.dict(os.environ, launched):
            train.main(args)
    except train.ONE_LINE_ERRORS as e:
        return e, out
    return None, out


@pytest.mark.parametrize("extra,pattern", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_leaves_nothing(extra, pattern, corpus_dir, spm_path, workdir):
    import re
    err, out = run_case(extra, corpus_dir, spm_path, workdir)
    assert err is not None, "trained instead of refusing"
    message = str(err)
    assert "\n" not in message and re.search(pattern, message), message
    assert not (out / "metrics.jsonl").exists() and not (out / "checkpoints").exists()


if __name__ == "__main__":               # the table for a closing note or the README
    import tempfile
    corpus = REPO / ".cache/corpus"
    spm = REPO / ".cache/tokenizer/spm.model"
    print("| case | arguments | message |\n|---|---|---|")
    for name, extra, _ in CASES:
        with tempfile.TemporaryDirectory() as d:
            d = make_bad_files(Path(d))
            err, _ = run_case(extra, corpus, spm, d)
            shown = " ".join(extra).replace(str(d), "TMP")
            msg = "TRAINED" if err is None else str(err).replace(str(d), "TMP")
            print(f"| {name} | `{shown}` | {msg} |")
