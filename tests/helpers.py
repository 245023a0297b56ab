"""Shared test helpers (import as `from tests.helpers import small_run`)."""
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def small_run(corpus_dir, spm_path, out_dir, *extra):
    """CLI args of a ~0.6M-parameter run: 2 layers of width 64 on 64-token sequences."""
    return ["--config", str(REPO / "configs/runs/tiny_cpu.toml"),
            f"--data.path={corpus_dir}", f"--data.tokenizer={spm_path}", "--data.seq_len=64",
            "--data.val_tokens=2048", "--model.dim=64", "--model.n_layers=2", "--model.n_heads=2",
            "--model.intermediate_size=160", "--train.micro_batch=4", "--train.grad_accum=2",
            "--train.max_steps=8", "--train.eval_every=4", "--train.save_every=4", "--log.log_every=1",
            "--log.progress=false", f"--train.out_dir={out_dir}", *extra]


def free_port() -> int:
    """A TCP port nobody listens on right now (for a rendezvous)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
