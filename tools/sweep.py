"""Run a grid of training runs one after another, resumably, then compare them (mean and spread over seeds).

    python tools/sweep.py --config configs/runs/tiny_cpu.toml --out runs/sweep_lr \\
        --grid optim.name=adamw,rgp --grid optim.lr=1e-3,3e-3 --grid train.seed=0,1 \\
        --set train.max_steps=200 --set optim.other_lr=1e-3

Every combination of the --grid values is one run directory under --out, named by its values
(`optim.name=rgp,optim.lr=0.003,train.seed=1`); --set values apply to all. Runs go one at a time through
`train.py` (each in its own process, `--train.resume=auto`). Killed half-way, the same command continues:
finished runs (a checkpoint at train.max_steps) are skipped, an interrupted one resumes from its newest
checkpoint (run_dir.py keeps its metrics one curve). Then it writes into --out:
  compare.png, compare.md     tools/compare.py over every run (curves and per-run table)
  summary.md, summary.json    one row per configuration, seeds pooled: final eval perplexity mean, spread
                              (sample std, min, max) and n, tokens/s median, optimizer-state bytes
`--launcher "torchrun --standalone --nproc_per_node=2"` runs each one data-parallel.
Tied keys vary together: `--grid optim.name+optim.matrix_lr=adamw:3e-3,rgp:1e-2` is two runs (each arm at its
own lr), named as if the keys were separate (`optim.name=rgp,optim.matrix_lr=1e-2`).
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import train  # noqa: E402
from checkpoint import complete_checkpoints  # noqa: E402
from config import ConfigError, parse_args  # noqa: E402
from tools.compare import compare  # noqa: E402
from tools.runs import eval_records, read_metrics, train_records  # noqa: E402

SEED_KEY = "train.seed"


def parse_pairs(items: list[str], what: str) -> list[tuple[str, str]]:
    pairs = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise ConfigError(f"{what} {item!r} is not KEY=VALUE[,VALUE...]; e.g. --{what} optim.lr=1e-3,3e-3")
        pairs.append((key, value))
    return pairs


def grid_runs(grid: list[tuple[str, str]]) -> list[list[tuple[str, str]]]:
    """Every combination of the grid's values, in the order given (last key varies fastest). A tied key
    `k1+k2` with values `a1:a2,b1:b2` contributes (k1, a1), (k2, a2) or (k1, b1), (k2, b2)."""
    axes = []
    for key, value in grid:
        keys = key.split("+")
        axis = []
        for item in value.split(","):
            parts = item.split(":") if len(keys) > 1 else [item]
            if len(parts) != len(keys) or not all(parts) or not all(keys):
                raise ConfigError(f"grid {key}={value}: {item!r} needs {len(keys)} ':'-separated values, one per key "
                                  f"of {key!r}; e.g. --grid optim.name+optim.matrix_lr=adamw:3e-3,rgp:1e-2")
            axis.append(list(zip(keys, parts)))
        axes.append(axis)
    return [[pair for pairs in combo for pair in pairs] for combo in itertools.product(*axes)]


def run_name(combo: list[tuple[str, str]]) -> str:
    return ",".join(f"{k}={v}" for k, v in combo) or "run"


def is_finished(run_dir: Path, max_steps: int) -> bool:
    done = complete_checkpoints(run_dir)
    return bool(done) and int(done[-1].name.split("_")[1]) >= max_steps


def summarize(runs: dict[str, Path], combos: dict[str, list[tuple[str, str]]]) -> list[dict]:
    """One row per configuration (the combination without train.seed): mean and spread over its seeds."""
    groups: dict[str, list[str]] = {}
    for name, combo in combos.items():
        key = run_name([(k, v) for k, v in combo if k != SEED_KEY])
        groups.setdefault(key, []).append(name)
    rows = []
    for key, names in groups.items():
        finals, rates, states = [], [], []
        for n in names:
            recs = read_metrics(runs[n])
            evals = [r["eval_ppl"] for r in eval_records(recs) if math.isfinite(r.get("eval_ppl", math.nan))]
            if evals:
                finals.append(evals[-1])
            train = train_records(recs)
            rates += [r["tokens_per_s"] for r in train if "tokens_per_s" in r]
            states += [r["optim_state_bytes"] for r in train if "optim_state_bytes" in r]
        rows.append({"config": key, "runs": len(names), "final_eval_ppl_mean": statistics.fmean(finals) if finals else None,
                     "final_eval_ppl_std": statistics.stdev(finals) if len(finals) > 1 else None,
                     "final_eval_ppl_min": min(finals) if finals else None,
                     "final_eval_ppl_max": max(finals) if finals else None, "n": len(finals),
                     "tokens_per_s_median": statistics.median(rates) if rates else None,
                     "optim_state_bytes": states[-1] if states else None})
    return rows


def markdown(rows: list[dict]) -> str:
    f = lambda x, fmt: "-" if x is None else format(x, fmt)  # noqa: E731
    lines = ["| config | seeds | final eval ppl (mean) | std | min | max | tokens/s | optimizer state |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        state = "-" if r["optim_state_bytes"] is None else f"{r['optim_state_bytes'] / 2**20:.1f} MiB"
        lines.append(f"| {r['config']} | {r['n']} | {f(r['final_eval_ppl_mean'], '.2f')} | "
                     f"{f(r['final_eval_ppl_std'], '.2f')} | {f(r['final_eval_ppl_min'], '.2f')} | "
                     f"{f(r['final_eval_ppl_max'], '.2f')} | {f(r['tokens_per_s_median'], '.0f')} | {state} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True, help="the base recipe (TOML)")
    ap.add_argument("--out", required=True, help="sweep directory: one run directory per combination")
    ap.add_argument("--grid", action="append", default=[], help="KEY=V1,V2,... (repeatable)")
    ap.add_argument("--set", action="append", default=[], help="KEY=VALUE for every run (repeatable)")
    ap.add_argument("--launcher", default="", help='e.g. "torchrun --standalone --nproc_per_node=2"')
    ap.add_argument("--x", default="tokens", help="x axis of compare.png (tokens, step, time)")
    args = ap.parse_args(argv)
    try:
        grid, fixed = parse_pairs(args.grid, "grid"), parse_pairs(args.set, "set")
        out = Path(args.out)
        combos = {run_name(c): c for c in grid_runs(grid)}
        runs = {name: out / name for name in combos}
        base = ["--config", args.config] + [f"--{k}={v}" for k, v in fixed]
        for name, combo in combos.items():     # every run's settings are checked before the first one trains
            train.validate_only(base + [f"--{k}={v}" for k, v in combo] + [f"--train.out_dir={runs[name]}"])
    except train.ONE_LINE_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    launcher = shlex.split(args.launcher) if args.launcher else [sys.executable]
    for i, (name, combo) in enumerate(combos.items(), 1):
        run_args = base + [f"--{k}={v}" for k, v in combo] + [f"--train.out_dir={runs[name]}", "--train.resume=auto"]
        max_steps = parse_args(run_args).train.max_steps
        if is_finished(runs[name], max_steps):
            print(f"[{i}/{len(combos)}] {name}: finished, skipped", flush=True)
            continue
        print(f"[{i}/{len(combos)}] {name}", flush=True)
        proc = subprocess.run([*launcher, str(REPO / "train.py"), *run_args], cwd=REPO,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
        if proc.returncode != 0:
            print(f"error: run {name} failed (exit {proc.returncode}); fix it and rerun the same command to continue",
                  file=sys.stderr)
            return proc.returncode
    table, png = compare([runs[n] for n in combos], args.x, out / "compare.png", out / "compare.md")
    rows = summarize(runs, combos)
    (out / "summary.json").write_text(json.dumps(rows, indent=1))
    (out / "summary.md").write_text(markdown(rows) + "\n")
    print(markdown(rows))
    print(f"\n{out / 'summary.md'}, {out / 'compare.md'}, {png}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
