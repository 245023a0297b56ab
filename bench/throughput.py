"""Training throughput (forward + backward + AdamW step) of our LLaMA vs transformers.LlamaForCausalLM.

    python bench/throughput.py [--size tiny] [--vocab 8192] [--seq 256] [--batch 8] [--rounds 7]
                               [--steps 3] [--warmup 2] [--threads N] [--profile]

Same config, same initial weights, same torch.optim.AdamW settings, fp32, SDPA attention on both
(HF: attn_implementation="sdpa"). The machine is noisy, so both are measured in ONE process,
interleaved: after warmup, rounds alternate A,B then B,A (ABBA) and the summary takes each side's
median tokens/s. One JSON line per round and a final
    {"bench": "throughput", "ours_tok_s": ..., "hf_tok_s": ..., "ratio": ...}
(ratio = ours / hf of the medians), plus the best-round ratio, the per-round paired ratios, the ratio of
tokens per process-CPU-second (robust to other jobs stealing the cores) and the 1-minute load average.
Prints figures only; never pass/fail.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from model.llama import Llama, LlamaArgs, size_table  # noqa: E402
from tools.export_hf import hf_config, to_hf_name  # noqa: E402


def build(args: LlamaArgs, seed: int):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    ours = Llama(args).float().train()
    hf = LlamaForCausalLM._from_config(hf_config(args), attn_implementation="sdpa", dtype=torch.float32).train()
    hf_params = dict(hf.named_parameters())
    with torch.no_grad():
        for n, p in ours.named_parameters():
            hf_params[to_hf_name(n)].copy_(p)
    return ours, hf


def make_step(name: str, model, opt):
    if name == "ours":
        def step(x, y):
            _, loss = model(x, y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss
    else:
        # HF shifts labels internally; feed the same (B, T) input so both process B*T tokens.
        def step(x, y):
            loss = model(input_ids=x, labels=x).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss
    return step


def time_round(step, batches, steps: int) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of `steps` training steps."""
    c0, t0 = time.process_time(), time.perf_counter()
    for i in range(steps):
        x, y = batches[i % len(batches)]
        step(x, y)
    return time.perf_counter() - t0, time.process_time() - c0


def _loadavg() -> float:
    try:
        import os
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return float("nan")


def profile(name: str, step, batches, steps: int = 2, rows: int = 25):
    from torch.profiler import ProfilerActivity, profile as tprofile

    with tprofile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
        for i in range(steps):
            x, y = batches[i % len(batches)]
            step(x, y)
    print(f"# profile: {name} ({steps} steps), top ops by self CPU time", file=sys.stderr)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows), file=sys.stderr)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="tiny")
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=7, help="measured rounds per model (interleaved)")
    ap.add_argument("--steps", type=int, default=3, help="training steps per round")
    ap.add_argument("--warmup", type=int, default=2, help="warmup steps per model before measuring")
    ap.add_argument("--threads", type=int, default=0, help="torch threads for both (0: keep torch's default)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--profile", action="store_true", help="print a torch.profiler table per model to stderr")
    a = ap.parse_args(argv)

    if a.threads:
        torch.set_num_threads(a.threads)
    threads = torch.get_num_threads()
    args = LlamaArgs(vocab_size=a.vocab, max_seq_len=a.seq, **size_table(a.size))
    ours, hf = build(args, a.seed)
    models = {"ours": ours, "hf": hf}
    steps = {n: make_step(n, m, torch.optim.AdamW(m.parameters(), lr=a.lr, weight_decay=0.0))
             for n, m in models.items()}
    g = torch.Generator().manual_seed(a.seed)
    batches = []
    for _ in range(2):
        seq = torch.randint(0, a.vocab, (a.batch, a.seq + 1), generator=g)
        batches.append((seq[:, :-1].contiguous(), seq[:, 1:].contiguous()))
    tokens = a.batch * a.seq * a.steps
    n_params = ours.num_params()
    print(json.dumps({"bench": "throughput_setup", "size": a.size, "vocab": a.vocab, "seq": a.seq, "batch": a.batch,
                      "params": n_params, "threads": threads, "steps_per_round": a.steps, "rounds": a.rounds,
                      "torch": torch.__version__, "hf_attn": hf.config._attn_implementation}), flush=True)

    for name in ("ours", "hf"):
        if a.warmup:
            time_round(steps[name], batches, a.warmup)
    if a.profile:
        for name in ("ours", "hf"):
            profile(name, steps[name], batches)

    rates = {"ours": [], "hf": []}
    cpu_rates = {"ours": [], "hf": []}   # tokens per CPU-second: insensitive to being descheduled
    for r in range(a.rounds):
        order = ("ours", "hf") if r % 2 == 0 else ("hf", "ours")
        for name in order:
            dt, cpu = time_round(steps[name], batches, a.steps)
            rates[name].append(tokens / dt)
            cpu_rates[name].append(tokens / cpu)
            print(json.dumps({"bench": "throughput_round", "round": r, "model": name, "seconds": round(dt, 4),
                              "cpu_seconds": round(cpu, 4), "tok_s": round(tokens / dt, 1)}), flush=True)

    ours_tok_s, hf_tok_s = statistics.median(rates["ours"]), statistics.median(rates["hf"])
    paired = [o / h for o, h in zip(rates["ours"], rates["hf"])]
    print(json.dumps({"bench": "throughput", "size": a.size, "threads": threads,
                      "ours_tok_s": round(ours_tok_s, 1), "hf_tok_s": round(hf_tok_s, 1),
                      "ratio": round(ours_tok_s / hf_tok_s, 4),
                      "best_ratio": round(max(rates["ours"]) / max(rates["hf"]), 4),
                      "paired_ratio_median": round(statistics.median(paired), 4),
                      "paired_ratio_min": round(min(paired), 4), "paired_ratio_max": round(max(paired), 4),
                      "cpu_time_ratio": round(statistics.median(cpu_rates["ours"]) / statistics.median(cpu_rates["hf"]), 4),
                      "load_avg_1m": round(_loadavg(), 2)}),
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
