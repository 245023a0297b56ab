"""Step time of data-parallel training on 2 CPU processes: this tree against another git revision, side by side.

    python bench/dp_steptime.py --before 6a29a1d          # rounds alternate before / after; medians and ratio
    python bench/dp_steptime.py --before HEAD~3 --rounds 5 --steps 30 --extra --optim.name=rgp

Each round runs `torchrun --nproc_per_node=2 train.py` on the tiny recipe (gloo) once from a worktree of the
`--before` revision and once from this tree (in alternating order), and reads tokens/s from metrics.jsonl
(logged intervals after the first, which holds start-up). One JSON line per run, then a summary line with the
median tokens/s of each side and after/before. Both sides use the same corpus and tokenizer (.cache/).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tools.runs import read_metrics, train_records  # noqa: E402


def emit(**kw):
    print(json.dumps(kw), flush=True)


def run(tree: Path, out: Path, steps: int, extra: list[str]) -> float:
    cmd = ["torchrun", "--standalone", "--nproc_per_node=2", "train.py", "--config", "configs/runs/tiny_cpu.toml",
           f"--data.path={REPO / '.cache/corpus'}", f"--data.tokenizer={REPO / '.cache/tokenizer/spm.model'}",
           "--train.micro_batch=4", f"--train.max_steps={steps}", "--train.eval_every=0", "--train.save_every=0",
           "--log.log_every=5", "--log.progress=false", f"--train.out_dir={out}", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise SystemExit(f"{tree}: train.py failed:\n{proc.stderr[-2000:]}")
    rates = [r["tokens_per_s"] for r in train_records(read_metrics(out)) if "tokens_per_s" in r][1:]
    return statistics.median(rates)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", required=True, help="git revision to compare with")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more train.py overrides")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        before_tree = tmp / "before"
        subprocess.run(["git", "worktree", "add", "--detach", str(before_tree), args.before], cwd=REPO, check=True,
                       capture_output=True)
        try:
            sides = {"before": before_tree, "after": REPO}
            rates = {"before": [], "after": []}
            for r in range(args.rounds):
                for side in (("before", "after") if r % 2 == 0 else ("after", "before")):
                    rate = run(sides[side], tmp / f"{side}{r}", args.steps, args.extra)
                    rates[side].append(rate)
                    emit(bench="dp_steptime", round=r, side=side, tokens_per_s=round(rate, 1))
            med = {k: statistics.median(v) for k, v in rates.items()}
            emit(bench="dp_steptime", summary=True, before=args.before, world=2, steps=args.steps,
                 before_tokens_per_s=round(med["before"], 1), after_tokens_per_s=round(med["after"], 1),
                 after_vs_before=round(med["after"] / med["before"], 3),
                 paired_ratio_median=round(statistics.median(a / b for a, b in zip(rates["after"], rates["before"])), 3))
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(before_tree)], cwd=REPO, capture_output=True)


if __name__ == "__main__":
    sys.exit(main())
