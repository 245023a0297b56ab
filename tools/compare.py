"""Compare runs: validation perplexity and training loss curves in one figure, plus a Markdown table.

    python tools/compare.py runs/tiny_adamw runs/tiny_rgp                       # -> ./compare.png + table on stdout
    python tools/compare.py runs/tiny_* --x step --out plots/lr.png --table-out plots/lr.md
    python tools/compare.py runs/tiny_rgp                                        # one run -> runs/tiny_rgp/plots/curves.png

RUN_DIR is a run directory written by train.py (config.toml + metrics.jsonl); runs still in progress work
(a half-written last line is skipped, steps logged twice after a resume count once: tools/runs.py).
Left panel: validation perplexity (eval_ppl); right panel: training loss; both log-scale y. x is tokens seen
(default: the fair axis when runs differ in batch size), optimizer step, or wall time (elapsed_s, which a
resumed run carries across restarts). Each run is labelled by the config keys that differ between the runs
(`optim.name=rgp optim.lr=0.01`); bookkeeping keys such as train.out_dir are ignored; when nothing differs,
or for a single run, the directory name is the label.

Table columns: run, final eval ppl, best eval ppl, tokens, wall time, tokens/s (median of the logged
values: robust to the slow first step and to eval pauses), peak memory (max peak_mem_bytes: CUDA max
allocated, or the process's max RSS on CPU), optimizer state (last optim_state_bytes, summed over ranks).
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from config import flatten  # noqa: E402
from tools.runs import (RunDirError, eval_records, human_bytes, read_config, read_metrics,  # noqa: E402
                        require_run_dir, train_records)

# Keys that differ between runs without saying anything about the experiment.
IGNORED_KEYS = {"train.out_dir", "train.resume", "train.stop_at_step", "train.device", "data.build_local",
                "log.progress", "log.wandb", "log.wandb_project", "log.wandb_mode"}
X_KEYS = {"tokens": "tokens", "step": "step", "time": "elapsed_s"}
X_LABELS = {"tokens": "tokens", "step": "optimizer step", "time": "wall time (s)"}
_MISSING = object()


# ------------------------------------------------------------------------------------------- labels

def fmt_value(v) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, bool):
        return str(v).lower()
    return str(v)


def differing_keys(configs: list[dict]) -> list[str]:
    """Flattened config keys whose values are not the same in every run (in first-seen order)."""
    flats = [flatten(c) for c in configs]
    keys: list[str] = []
    for f in flats:
        keys += [k for k in f if k not in keys]
    return [k for k in keys if k not in IGNORED_KEYS
            and len({repr(f.get(k, _MISSING)) for f in flats}) > 1]


def run_labels(run_dirs: list[Path], configs: list[dict]) -> list[str]:
    """`key=value ...` over the differing keys; the directory name when that is empty or not unique."""
    keys = differing_keys(configs) if len(configs) > 1 else []
    labels = []
    for d, cfg in zip(run_dirs, configs):
        flat = flatten(cfg)
        parts = [f"{k}={fmt_value(flat[k])}" for k in keys if k in flat]
        labels.append(" ".join(parts) or d.name)
    if len(set(labels)) < len(labels):  # e.g. seeds hidden by an ignored key: make them distinguishable
        labels = [f"{d.name}: {lab}" if lab != d.name else lab for d, lab in zip(run_dirs, labels)]
    return labels


# ------------------------------------------------------------------------------------------- summary

def fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def fmt_count(n: float | None) -> str:
    """Tokens: 1234567 -> '1.23M'."""
    if n is None:
        return "-"
    for div, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.2f}{suffix}"
    return f"{int(n)}"


def finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def summarize(records: list[dict]) -> dict:
    """Raw numbers of one run (None where the run has not logged them yet)."""
    tr, ev = train_records(records), eval_records(records)
    ppls = [r["eval_ppl"] for r in ev if finite(r.get("eval_ppl"))]
    tps = [r["tokens_per_s"] for r in tr if finite(r.get("tokens_per_s"))]
    mems = [r["peak_mem_bytes"] for r in tr if finite(r.get("peak_mem_bytes"))]
    states = [r["optim_state_bytes"] for r in tr if finite(r.get("optim_state_bytes"))]
    tokens = [r["tokens"] for r in records if finite(r.get("tokens"))]
    elapsed = [r["elapsed_s"] for r in records if finite(r.get("elapsed_s"))]
    return {"final_ppl": ppls[-1] if ppls else None, "best_ppl": min(ppls) if ppls else None,
            "tokens": max(tokens) if tokens else None, "wall_s": max(elapsed) if elapsed else None,
            "tokens_per_s": statistics.median(tps) if tps else None,
            "peak_mem_bytes": max(mems) if mems else None, "optim_state_bytes": states[-1] if states else None,
            "last_step": records[-1]["step"] if records else None}


def markdown_table(labels: list[str], summaries: list[dict]) -> str:
    head = ["run", "final eval ppl", "best eval ppl", "tokens", "wall time", "tokens/s", "peak memory",
            "optimizer state"]
    ppl = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    rows = [[lab, ppl(s["final_ppl"]), ppl(s["best_ppl"]), fmt_count(s["tokens"]), fmt_duration(s["wall_s"]),
             "-" if s["tokens_per_s"] is None else f"{s['tokens_per_s']:.0f}",
             human_bytes(s["peak_mem_bytes"]), human_bytes(s["optim_state_bytes"])]
            for lab, s in zip(labels, summaries)]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- plot

def series(records: list[dict], x: str, y: str) -> tuple[list[float], list[float]]:
    """(xs, ys) of records holding both finite values (skipped NaN steps and unlogged fields drop out)."""
    xk = X_KEYS[x]
    pts = [(r[xk], r[y]) for r in records if finite(r.get(xk)) and finite(r.get(y)) and r[y] > 0]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot(runs: list[tuple[str, list[dict]]], x: str, out: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")  # files only: works on a headless node and never opens a window
    import matplotlib.pyplot as plt

    fig, (ax_ppl, ax_loss) = plt.subplots(1, 2, figsize=(13, 5))
    for i, (label, records) in enumerate(runs):
        color = f"C{i % 10}"  # the same colour for a run in both panels, even when one panel has no data yet
        xs, ys = series(eval_records(records), x, "eval_ppl")
        ax_ppl.plot(xs, ys, marker="o", markersize=3, color=color, label=label)
        xs, ys = series(train_records(records), x, "loss")
        # a run that has logged one step so far would be an invisible zero-length line without a marker
        ax_loss.plot(xs, ys, linewidth=1, color=color, marker="o" if len(xs) == 1 else None, markersize=3,
                     label=label)
    for ax, title in ((ax_ppl, "validation perplexity"), (ax_loss, "training loss")):
        ax.set_yscale("log")
        ax.set_xlabel(X_LABELS[x])
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    ax_ppl.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def default_out(run_dirs: list[Path]) -> Path:
    """One run: its own plots/ folder (docs/design.md §1); several: ./compare.png (no run owns the comparison)."""
    if len(run_dirs) == 1:
        return run_dirs[0] / "plots" / "curves.png"
    return Path("compare.png")


def compare(run_dirs: list[str | Path], x: str = "tokens", out: str | Path | None = None,
            table_out: str | Path | None = None) -> tuple[str, Path]:
    """Plot and tabulate; returns (markdown table, png path). Raises RunDirError for a non-run path."""
    dirs = [require_run_dir(d) for d in run_dirs]
    records = [read_metrics(d) for d in dirs]
    labels = run_labels(dirs, [read_config(d) for d in dirs])
    table = markdown_table(labels, [summarize(r) for r in records])
    png = plot(list(zip(labels, records)), x, Path(out) if out else default_out(dirs))
    if table_out:
        Path(table_out).parent.mkdir(parents=True, exist_ok=True)
        Path(table_out).write_text(table + "\n")
    return table, png


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", metavar="RUN_DIR")
    ap.add_argument("--out", default=None, help="PNG path (default ./compare.png, or RUN/plots/curves.png for one run)")
    ap.add_argument("--x", choices=sorted(X_KEYS), default="tokens")
    ap.add_argument("--table-out", default=None, help="also write the Markdown table here")
    args = ap.parse_args(argv)
    try:
        table, png = compare(args.runs, args.x, args.out, args.table_out)
    except RunDirError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table)
    print(f"\nplot: {png}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
