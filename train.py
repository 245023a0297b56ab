"""Pre-train a LLaMA on C4 with AdamW, GaLore, RGP or their 8-bit variants. One loop, top to bottom.

    # one process, CPU, the embedded default (builds .cache/corpus and .cache/tokenizer on first use)
    python train.py --config configs/runs/tiny_cpu.toml
    # data parallel, 2 processes (CPU: gloo; GPU: nccl)
    torchrun --nproc_per_node=2 train.py --config configs/runs/tiny_cpu.toml --train.micro_batch=4
    # through DeepSpeed: micro batch, accumulation, clipping and precision come from the JSON
    deepspeed --num_gpus 2 train.py --config configs/runs/c4_llama_60m.toml --deepspeed configs/deepspeed/zero2.json
    # resume the newest complete checkpoint of the run directory
    python train.py --config configs/runs/tiny_cpu.toml --train.resume=auto

A run writes to --train.out_dir: config.toml (resolved), metrics.jsonl (one JSON object per logged step),
checkpoints/step_XXXXXXXX/. The optimizer is always wrapped in optim.sharded.ShardedOptimizer: with one
process it is a pass-through; with N it gives every parameter one owner rank that keeps its state and
computes its projection and update (docs/design.md §5).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import time
import uuid
from pathlib import Path

import torch
import torch.distributed as dist

from checkpoint import CheckpointError, load_checkpoint, read_meta, resolve_resume, save_checkpoint
from config import ConfigError, DataConfig, parse_args, to_toml
from data.c4 import DataError, TrainBatches, check_layout, is_hub, validation_set
from data.corpus import CorpusError
from data.tokenizer import TokenizerError, load_tokenizer
from model import build_model
from optim import build_optimizer
from optim.schedule import lr_multiplier
from optim.sharded import ShardedOptimizer
from run_dir import RunDirError, resume_changes, run_dir_lock, start_metrics

PREEMPTED_EXIT = 143  # 128 + SIGTERM; launch/slurm.sbatch requeues on the PREEMPT_MARKER file, not on a code


class RunError(RuntimeError):
    """A run-level problem (existing run directory, NaN loss, ...); one line that names the fix."""


def setup_distributed(device_pref: str, force_collectives: bool = False) -> tuple[int, int, torch.device]:
    """Rank, world size and device; starts the process group when a launcher set WORLD_SIZE > 1 (or, with
    force_collectives, also for one process, so that one GPU runs the sharded optimizer's NCCL path)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device_pref == "auto" else device_pref == "cuda"
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if (world > 1 or force_collectives) and not dist.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        if "MASTER_ADDR" in os.environ:            # a launcher (torchrun, deepspeed, srun) set the rendezvous
            dist.init_process_group(backend, device_id=device if use_cuda else None)
        else:                                      # plain `python train.py`: a one-process group on a free port
            import socket
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
            dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    rank = dist.get_rank() if dist.is_initialized() else 0
    return rank, world, device


def all_sum(values: list[float], device) -> list[float]:
    """Sum plain numbers over ranks (one small collective)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def prepare_data(cfg, rank: int) -> None:
    """Build the offline corpus / tokenizer when they are missing (rank 0; others wait): only at the embedded
    default locations under .cache/, or anywhere with data.build_local (check_run refused other missing paths)."""
    if rank == 0:
        from data.corpus import ensure_corpus
        from data.tokenizer import ensure_tokenizer
        if not is_hub(cfg.data.path) and not Path(cfg.data.path).exists():
            ensure_corpus(cfg.data.path)
        if cfg.data.tokenizer.endswith(".model") and not Path(cfg.data.tokenizer).exists():
            ensure_tokenizer(cfg.data.tokenizer, cfg.data.path)
    if dist.is_initialized():
        dist.barrier()


@torch.no_grad()
def evaluate(model, val: torch.Tensor, micro_batch: int, rank: int, world: int, device) -> float:
    """Mean next-token loss over the fixed validation set; ranks split the sequences and sum."""
    loss_sum, count = 0.0, 0
    mine = val[rank::world]
    for batch in mine.split(micro_batch):
        batch = batch.to(device)
        _, loss = model(batch[:, :-1], batch[:, 1:])
        n = batch[:, 1:].numel()
        loss_sum, count = loss_sum + loss.item() * n, count + n
    loss_sum, count = all_sum([loss_sum, count], device)
    return loss_sum / count


class RunLog:
    """metrics.jsonl + stdout (+ wandb), rank 0 only."""

    def __init__(self, cfg, out_dir: Path, rank: int, start_step: int):
        self.on = rank == 0
        self.path = out_dir / "metrics.jsonl"
        self.wandb = None
        self.bar = None
        if not self.on:
            return
        if cfg.log.wandb:
            import wandb
            id_file = out_dir / "wandb_id.txt"  # one wandb run per run directory, continued on resume
            run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:8]
            id_file.write_text(run_id)
            self.wandb = wandb.init(project=cfg.log.wandb_project, id=run_id, resume="allow", dir=str(out_dir),
                                    mode=cfg.log.wandb_mode, config=cfg.to_dict(), name=out_dir.name)
        if cfg.log.progress and sys.stdout.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=cfg.train.max_steps, initial=start_step, dynamic_ncols=True)

    def log(self, record: dict, show: bool = True) -> None:
        if not self.on:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb:
            self.wandb.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])
        if show:
            text = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items())
            self.bar.write(text) if self.bar else print(text, flush=True)

    def advance(self, loss: float) -> None:
        if self.bar:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.3f}")

    def close(self) -> None:
        if self.bar:
            self.bar.close()
        if self.wandb:
            self.wandb.finish()


def peak_memory_bytes(device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def resolve_run(cfg, world: int, device: torch.device):
    """Settings that depend on the world size and device (accumulation from train.global_batch, the DeepSpeed
    JSON, the dtype), then `check_run`. Returns (DeepSpeed settings or None, dtype)."""
    t = cfg.train
    if t.global_batch:
        if t.global_batch % (t.micro_batch * world):
            raise ConfigError(f"train.global_batch={t.global_batch} is not a multiple of micro_batch x world size "
                              f"= {t.micro_batch} x {world}; change --train.micro_batch or --train.global_batch")
        t.grad_accum = t.global_batch // (t.micro_batch * world)
    ds = None
    if cfg.deepspeed:  # the ZeRO stage comes from the JSON; batch, clipping and dtype from the run config
        from optim.deepspeed_glue import read_deepspeed_config, reconcile_with_run
        ds = read_deepspeed_config(cfg.deepspeed, world)
        t.dtype = reconcile_with_run(ds, t, world)
        if ds.comm_dtype and cfg.optim.comm_dtype not in ("auto", ds.comm_dtype):
            raise ConfigError(f"DeepSpeed config sets communication_data_type={ds.comm_dtype} but the run has "
                              f"optim.comm_dtype={cfg.optim.comm_dtype}; drop one or make them agree")
        if ds.comm_dtype:          # the ShardedOptimizer does the communication: it takes DeepSpeed's dtype
            cfg.optim.comm_dtype = ds.comm_dtype
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32,
             "float32": torch.float32, "bfloat16": torch.bfloat16}[t.dtype]
    if ds is not None:
        ds.bf16 = dtype == torch.bfloat16
    check_run(cfg, world, dtype, ds is not None)
    return ds, dtype


def validate_only(argv: list[str]) -> int:
    """`python train.py --validate ...` (the launch scripts run it first, with WORLD_SIZE set to the job's): every
    data-free check in about a second, so a bad config is one line before torchrun or deepspeed start workers
    (whose launcher would print its own traceback after the worker's one-line error)."""
    cfg = parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = torch.cuda.is_available() if cfg.train.device == "auto" else cfg.train.device == "cuda"
    resolve_run(cfg, world, torch.device("cuda" if use_cuda else "cpu"))
    return 0


def check_run(cfg, world: int, dtype: torch.dtype, deepspeed: bool) -> None:
    """Every check that needs no data, before anything is built or written: a bad run fails in about a second
    with one line. (Types, ranges and key names were checked by parse_args.)"""
    t, d = cfg.train, cfg.data
    out_dir = Path(t.out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"train.out_dir {str(out_dir)!r} is an existing file; choose a directory")
    defaults = DataConfig()
    # The offline corpus and tokenizer are built only at the embedded default locations (or with
    # data.build_local): a mistyped path is an error, never a silently built stand-in.
    if not is_hub(d.path) and not Path(d.path).exists() and not (d.build_local or d.path == defaults.path):
        raise DataError(f"data.path {d.path!r} does not exist; fix the path, or build a local corpus there with "
                        f"python data/corpus.py --out {d.path} (or pass --data.build_local=true)")
    if d.tokenizer.endswith(".model") and not Path(d.tokenizer).exists() and \
            not (d.build_local or d.tokenizer == defaults.tokenizer):
        raise DataError(f"data.tokenizer {d.tokenizer!r} does not exist; fix the path, or train one there with "
                        f"python data/tokenizer.py --out {d.tokenizer} (or pass --data.build_local=true)")
    check_layout(d.num_streams, world, t.micro_batch * t.grad_accum * world)
    with torch.device("meta"):   # the optimizer's own checks (knobs, ranks against the shapes), nothing allocated
        build_optimizer(build_model(cfg.model.size, cfg.model.vocab_size or 8, d.seq_len, dim=cfg.model.dim,
                                    n_layers=cfg.model.n_layers, n_heads=cfg.model.n_heads,
                                    intermediate_size=cfg.model.intermediate_size), cfg.optim)
    if cfg.optim.layerwise and (world > 1 or deepspeed or dtype != torch.float32 or t.grad_clip > 0):
        raise ConfigError("optim.layerwise needs one process, train.dtype=float32 and train.grad_clip=0 "
                          "(a parameter is updated before the other gradients exist)")


def main(argv: list[str] | None = None) -> int:
    """Train; the signal handlers installed for preemption are removed again on return (tests call main)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--validate" in argv:
        return validate_only([a for a in argv if a != "--validate"])
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    started_here = not (dist.is_available() and dist.is_initialized())
    try:
        with contextlib.ExitStack() as held:     # the run directory's lock, released however run() ends
            return run(argv, held)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if started_here and dist.is_available() and dist.is_initialized():   # also after an error
            dist.destroy_process_group()


def run(argv: list[str] | None, held: contextlib.ExitStack) -> int:
    cfg = parse_args(argv)
    t, d = cfg.train, cfg.data
    if cfg.deepspeed and not Path(cfg.deepspeed).is_file():
        raise ConfigError(f"DeepSpeed config {cfg.deepspeed!r} not found; pass e.g. configs/deepspeed/zero2.json")
    if cfg.deepspeed and "WORLD_SIZE" not in os.environ:
        raise ConfigError("--deepspeed needs a launcher: deepspeed --num_gpus N train.py ..., or "
                          "bash launch/deepspeed.sh RECIPE.toml (plain python has no rank environment)")
    rank, world, device = setup_distributed(t.device, t.force_collectives)
    ds, dtype = resolve_run(cfg, world, device)

    # --- the run directory: one job at a time, one metrics curve, only resumable changes (run_dir.py) ---
    out_dir = Path(t.out_dir)
    lock_error = ""
    if rank == 0:
        try:
            held.enter_context(run_dir_lock(out_dir))
        except RunDirError as e:
            lock_error = str(e)
    if all_sum([float(bool(lock_error))], device)[0]:   # every rank stops, not only rank 0
        raise RunDirError(lock_error or f"run directory {out_dir} is in use by another job (see rank 0)")
    ckpt = resolve_resume(t.resume, out_dir)
    if ckpt is None and t.resume == "none" and (out_dir / "metrics.jsonl").exists():
        raise RunError(f"{out_dir} already holds a run; continue it with --train.resume=auto "
                       f"or choose another --train.out_dir")
    saved = read_meta(ckpt) if ckpt is not None else None
    if saved is not None:
        changes = resume_changes(saved.get("config", {}), cfg.to_dict())
        if rank == 0 and changes:
            print(f"resume from {ckpt.name} with changed settings: {'; '.join(changes)}", flush=True)
    if rank == 0:
        note = start_metrics(out_dir, saved["step"] if saved is not None else None)
        if note:
            print(note, flush=True)
        (out_dir / "config.toml").write_text(to_toml(cfg))

    # --- data, model, optimizer ---
    prepare_data(cfg, rank)
    tokenizer = load_tokenizer(d.tokenizer)
    torch.manual_seed(t.seed)
    model = build_model(cfg.model.size, cfg.model.vocab_size or tokenizer.vocab_size, d.seq_len,
                        dim=cfg.model.dim, n_layers=cfg.model.n_layers, n_heads=cfg.model.n_heads,
                        intermediate_size=cfg.model.intermediate_size, norm_eps=cfg.model.norm_eps,
                        rope_theta=cfg.model.rope_theta).to(device=device, dtype=dtype)
    # ZeRO-1 semantics (all-reduce every gradient) unless a DeepSpeed stage-2 config asks for reduce-to-owner
    optimizer = ShardedOptimizer(model.named_parameters(), cfg.optim, grad_mode=ds.grad_mode if ds else "allreduce",
                                 collectives_at_world_size_1=t.force_collectives)
    optimizer.async_weights = True  # step() only starts sending the updated weights back ...
    optimizer.wait_in_forward(model)  # ... and each module's forward waits for its own (the rest: wait_for_weights)
    stepper = None
    if cfg.optim.layerwise:  # step each parameter in its backward hook (optim/layerwise.py)
        from optim.layerwise import LayerwiseStepper
        stepper = LayerwiseStepper(optimizer.inner)
    engine = None
    if ds is not None:
        from optim.deepspeed_glue import init_deepspeed
        engine = init_deepspeed(model, optimizer, ds)
    batches = TrainBatches(d.path, tokenizer, d.seq_len, d.num_streams, t.micro_batch, t.grad_accum, rank, world)
    val = validation_set(d.path, tokenizer, d.seq_len, d.val_tokens)
    global_batch = t.micro_batch * t.grad_accum * world
    tokens_per_step = global_batch * d.seq_len
    model_args = {k: getattr(model.args, k) for k in vars(model.args)}

    step, tokens, elapsed_before = 0, 0, 0.0
    if ckpt is not None:
        meta = load_checkpoint(ckpt, model, optimizer, batches, rank, d.num_streams)
        if meta["model_args"] != model_args:
            raise CheckpointError(f"checkpoint {ckpt} was trained with model {meta['model_args']}; "
                                  f"resume with the run's own --model.* settings")
        step, tokens, elapsed_before = meta["step"], meta["tokens"], meta["elapsed_s"]
    # SIGTERM / SIGUSR1 (SLURM's warning): checkpoint at the next step boundary, then exit for requeue.
    preempt = {"flag": 0.0}
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, lambda *_: preempt.__setitem__("flag", 1.0))
    log = RunLog(cfg, out_dir, rank, step)
    if rank == 0:
        print(f"model {cfg.model.size}: {model.num_params() / 1e6:.2f}M params | optimizer {cfg.optim.name} | "
              f"world {world} | global batch {global_batch} x {d.seq_len} tokens | device {device} {dtype} | "
              f"{'resumed from ' + str(ckpt) if ckpt else 'fresh start'}", flush=True)

    def save(step_now: int) -> None:
        meta = {"step": step_now, "tokens": tokens, "elapsed_s": elapsed_before + time.time() - t0,
                "world_size": world, "model_args": model_args, "config": cfg.to_dict()}
        save_checkpoint(out_dir, step_now, meta, model, optimizer, batches, rank, t.keep_last)

    t0 = time.time()
    t_log, tokens_log = time.time(), tokens
    while step < t.max_steps:
        multiplier = lr_multiplier(step, t.max_steps, t.warmup_frac, t.min_lr_frac)
        lr = cfg.optim.lr * multiplier
        for group in optimizer.param_groups:  # optim.matrix_lr / other_lr, each on the same schedule
            group["lr"] = group.get("base_lr", cfg.optim.lr) * multiplier

        # forward/backward over this rank's micro-batches; gradients accumulate in .grad
        loss_sum = torch.zeros((), device=device)
        step_batches = batches.next_step()       # loading the data and the forward overlap the weights' arrival
        for micro, (x, y) in enumerate(step_batches):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            # gradient buckets are sent from backward hooks; ZeRO-1 accumulates all but the last micro-batch locally
            last = micro == t.grad_accum - 1
            with contextlib.nullcontext() if last else optimizer.no_sync():
                if engine is not None:
                    _, loss = engine(x, y)
                    engine.backward(loss)  # DeepSpeed divides by gradient_accumulation_steps itself
                elif stepper is not None and last:
                    _, loss = model(x, y)
                    with stepper.armed():  # the last backward of the window updates and frees each gradient
                        (loss / t.grad_accum).backward()
                else:
                    _, loss = model(x, y)
                    (loss / t.grad_accum).backward()
            loss_sum += loss.detach()

        # one small collective: the global mean loss, and whether any rank saw a non-finite loss or a signal
        loss_mean, bad_loss, stop = all_sum([loss_sum.item() / t.grad_accum, float(not math.isfinite(loss_sum.item())),
                                             preempt["flag"]], device)
        loss_mean /= world
        grad_norm = None
        if not bad_loss and stepper is None:  # (layer-wise mode already stepped inside backward)
            optimizer.sync_gradients()
            grad_norm = optimizer.clip_grad_norm_(t.grad_clip)  # global: the same on every rank
        # A non-finite loss or gradient norm (an inf norm makes clipping zero every gradient, a NaN poisons them
        # all) stops the run before any weight moves, or skips the step under train.skip_nonfinite.
        bad = "loss" if bad_loss else \
            "gradient norm" if grad_norm is not None and not math.isfinite(float(grad_norm)) else ""
        if bad and not t.skip_nonfinite:
            raise RunError(f"{bad} became {loss_mean if bad == 'loss' else float(grad_norm)} at step {step + 1}; "
                           f"the last good checkpoint is untouched (lower --optim.lr, or pass "
                           f"--train.skip_nonfinite=true to skip such steps)")
        if bad:
            optimizer.zero_grad(set_to_none=True)
            log.log({"step": step + 1, "skipped_nonfinite": True, "loss": loss_mean,
                     **({"grad_norm": float(grad_norm)} if grad_norm is not None else {})})
        elif stepper is None:
            if engine is not None:
                engine.step()  # calls optimizer.step() at the accumulation boundary
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens += tokens_per_step
        log.advance(loss_mean)

        if not bad and (step % cfg.log.log_every == 0 or step == t.max_steps):
            now = time.time()
            state_bytes = all_sum([optimizer.state_bytes()], device)[0]
            log.log({"step": step, "tokens": tokens, "loss": loss_mean, "lr": lr,
                     **({"grad_norm": float(grad_norm)} if grad_norm is not None else {}),
                     "tokens_per_s": (tokens - tokens_log) / (now - t_log),
                     "elapsed_s": elapsed_before + now - t0, "peak_mem_bytes": peak_memory_bytes(device),
                     "optim_state_bytes": int(state_bytes), **rank_summary(optimizer)})
            t_log, tokens_log = now, tokens
        if t.eval_every and (step % t.eval_every == 0 or step == t.max_steps):
            optimizer.wait_for_weights()
            eval_loss = evaluate(model, val, t.micro_batch, rank, world, device)
            log.log({"step": step, "tokens": tokens, "eval_loss": eval_loss, "eval_ppl": math.exp(eval_loss),
                     "elapsed_s": elapsed_before + time.time() - t0, **rank_summary(optimizer, full=True)})
        stop_here = step == t.stop_at_step
        if stop or stop_here or (t.save_every and step % t.save_every == 0) or step == t.max_steps:
            save(step)
        if stop:
            if rank == 0:
                print(f"preempted: saved step {step} to {out_dir}/checkpoints; exiting {PREEMPTED_EXIT} "
                      f"to be requeued", flush=True)
                marker = os.environ.get("PREEMPT_MARKER")  # launch/slurm.sbatch requeues when this file exists
                if marker:
                    Path(marker).write_text(f"step {step} saved to {out_dir}\n")
            log.close()
            return PREEMPTED_EXIT
        if stop_here:
            break
    optimizer.wait_for_weights()
    log.close()
    return 0


def rank_summary(optimizer, full: bool = False) -> dict:
    """Metrics fields for the projection ranks (optim.rank_decay / rank_energy change them at refreshes):
    {"ranks": {"mean", "min", "max"}}, plus "ranks_per_matrix" {name: rank} when `full` (eval steps). Empty when
    the optimizer does not report them (current_ranks() absent, or no projected matrix has a basis yet). Called
    on every rank: a wrapper may gather the owners' ranks with a collective."""
    current_ranks = getattr(optimizer, "current_ranks", None)
    ranks = current_ranks() if current_ranks is not None else {}
    if not ranks:
        return {}
    values = list(ranks.values())
    out = {"ranks": {"mean": sum(values) / len(values), "min": min(values), "max": max(values)}}
    if full:
        out["ranks_per_matrix"] = dict(ranks)
    return out


# What `python train.py` reports as one line `error: ...` with exit code 2 (no traceback).
ONE_LINE_ERRORS = (ConfigError, DataError, CorpusError, TokenizerError, CheckpointError, RunError, RunDirError,
                   ValueError)

if __name__ == "__main__":
    try:
        sys.exit(main())
    except ONE_LINE_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        if int(os.environ.get("WORLD_SIZE", "1")) == 1:
            sys.exit(2)
        # Several processes: main() has already released the run (its finally blocks ran; metrics.jsonl is
        # written line by line). Skip the interpreter's teardown: after an error on every rank, gloo/c10d
        # destructors racing a peer that exits at the same moment can abort (SIGABRT, "terminate called without
        # an active exception": 5 of 30 pairs of ranks refusing mismatched settings) and turn exit 2 into a crash.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(2)
