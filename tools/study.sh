#!/usr/bin/env bash
# The convergence study of docs/results.md, one resumable command (every stage is a tools/sweep.py grid; killed at
# any point, the same command skips finished runs, resumes the interrupted one and rewrites the same tables):
#
#     OMP_NUM_THREADS=1 bash tools/study.sh [STAGE ...]     # stages: other_lr a b c d e report (default: all, in order)
#
# Runs go one at a time, one thread each (the study machine had 2 shared cores); the whole study is 37 runs of
# 2-3 min (~100 min on 2 busy cores). Output: runs/study/<stage>/{summary.md,summary.json,compare.md,compare.png} and one run directory per
# combination. The model is configs/models/llama_cpu.toml (72% projectable), the recipe configs/runs/cpu_study.toml.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
OUT=${STUDY_OUT:-runs/study}
CPU=configs/runs/cpu_study.toml
OTHER_LR=3e-3        # tuned by stage other_lr (AdamW, matrix_lr 3e-3): 1e-3 -> 750, 3e-3 -> 682, 1e-2 -> 721 ppl
ARMS=adamw,galore,rgp,rgp8bit
sweep() { python tools/sweep.py "$@"; }
best_lrs() {         # "adamw:1e-3,galore:3e-4,...": each arm's matrix_lr with the lowest final eval ppl among seed-0 runs of $1
  python - "$1" "$ARMS" <<'PY'
import math, re, sys
from pathlib import Path
sys.path.insert(0, ".")
from tools.runs import eval_records, read_metrics
best = {}
for run in Path(sys.argv[1]).glob("train.seed=0,optim.name=*,optim.matrix_lr=*"):
    name, lr = re.fullmatch(r"train.seed=0,optim.name=(\w+),optim.matrix_lr=(.+)", run.name).groups()
    ev = [r for r in eval_records(read_metrics(run)) if math.isfinite(r.get("eval_ppl", math.nan))]
    if ev and ev[-1]["step"] == 150 and (name not in best or ev[-1]["eval_ppl"] < best[name][1]):
        best[name] = (lr, ev[-1]["eval_ppl"])
print(",".join(f"{a}:{best[a][0]}" for a in sys.argv[2].split(",") if a in best))
PY
}

stage_other_lr() {   # the non-projected parameters' lr, tuned once with AdamW and then shared by every arm
  sweep --config $CPU --out $OUT/other_lr --grid optim.other_lr=1e-3,3e-3,1e-2 \
        --set optim.name=adamw --set optim.matrix_lr=3e-3 --set train.seed=0
}
stage_a() {          # (a) projection-isolating: same other_lr everywhere, each arm's matrix_lr swept (seed 0), then a
                     # second seed at each arm's best matrix_lr (A_BEST, read off the seed-0 table)
  sweep --config $CPU --out $OUT/a_local --grid train.seed=0 --grid optim.name=$ARMS \
        --grid optim.matrix_lr=3e-4,1e-3,3e-3 --set optim.other_lr=$OTHER_LR
  # the first grid was 1e-3,3e-3,1e-2 (AdamW got 1e-2 and was worst there; the grid moved down), and AdamW was
  # still best at the low edge 3e-4, so it gets 1e-4 too
  sweep --config $CPU --out $OUT/a_local --grid train.seed=0 --grid optim.name+optim.matrix_lr=adamw:1e-2,adamw:1e-4 \
        --set optim.other_lr=$OTHER_LR
  sweep --config $CPU --out $OUT/a_local --grid train.seed=1 --grid optim.name+optim.matrix_lr=$(best_lrs $OUT/a_local) \
        --set optim.other_lr=$OTHER_LR
}
stage_b() {          # (b) the same on the second corpus (Debian kernel docs; the tokenizer never saw them): each arm at
                     # its best matrix_lr of (a), 2 seeds
  python data/corpus.py --source linux-doc --out .cache/corpus_linuxdoc --download-dir .cache/downloads
  sweep --config $CPU --out $OUT/b_linuxdoc --grid train.seed=0,1 --grid optim.name+optim.matrix_lr=$(best_lrs $OUT/a_local) \
        --set optim.other_lr=$OTHER_LR --set data.path=.cache/corpus_linuxdoc
}
stage_c() {          # (c) recipe vs recipe on tiny (its own recipe, 200 steps of 8 x 256 tokens): AdamW at lr 1e-3, the
                     # best of the sweep {3e-4, 1e-3, 3e-3, 1e-2} recorded in configs/runs/tiny_cpu.toml ...
  sweep --config configs/runs/tiny_cpu.toml --out $OUT/c_recipe_adamw --grid train.seed=0,1 --set optim.lr=1e-3 \
        --set log.progress=false
  # ... vs the GaLore recipe as published: lr 1e-2 for everything, scale 0.25, rank 128 (half of dim 256), T=200
  sweep --config configs/runs/tiny_cpu.toml --out $OUT/c_recipe_galore --grid train.seed=0,1 \
        --set optim.name=galore --set optim.lr=1e-2 --set optim.scale=0.25 --set optim.rank=128 \
        --set optim.update_proj_gap=200 --set log.progress=false
}
stage_d() {          # (d) refresh interval T for galore and rgp at their best matrix_lr of (a), seed 0; T=50 is in (a)
  sweep --config $CPU --out $OUT/d_gap --grid optim.name+optim.matrix_lr=$(best_lrs $OUT/a_local | tr , '\n' \
        | grep -E '^(galore|rgp):' | paste -sd,) --grid optim.update_proj_gap=25,200 \
        --set optim.other_lr=$OTHER_LR --set train.seed=0
}
stage_e() {          # (e) rank schedules and basis precision (rgp at its best matrix_lr of (a), 2 seeds): fixed rank vs
                     # rank_decay=2 vs rank_energy=0.9, and bf16 / int8 bases
  sweep --config $CPU --out $OUT/e_schedules --grid train.seed=0,1 \
        --grid optim.rank_decay+optim.rank_energy+optim.basis_dtype=1:0:float32,2:0:float32,1:0.9:float32,1:0:bfloat16,1:0:int8 \
        --set optim.name=rgp --set optim.matrix_lr=1e-3 --set optim.other_lr=$OTHER_LR
}

stage_report() {     # tables (Markdown on stdout) and the PNGs of docs/results.md, from the stages' run directories
  STUDY_OUT=$OUT python - <<'PY'
import json, math, os, statistics, sys
from pathlib import Path
sys.path.insert(0, ".")
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
from tools.compare import compare
from tools.runs import eval_records, read_config, read_metrics, train_records

OUT, DOCS = Path(os.environ["STUDY_OUT"]), Path("docs/results")
DOCS.mkdir(parents=True, exist_ok=True)
ARMS = ["adamw", "galore", "rgp", "rgp8bit"]

def runs(stage):
    d = OUT / stage
    return sorted(p for p in d.iterdir() if (p / "metrics.jsonl").is_file()) if d.is_dir() else []

def info(run):
    cfg, recs = read_config(run), read_metrics(run)
    ev = [r["eval_ppl"] for r in eval_records(recs) if math.isfinite(r.get("eval_ppl", math.nan))]
    tps = [r["tokens_per_s"] for r in train_records(recs) if "tokens_per_s" in r]
    st = [r["optim_state_bytes"] for r in train_records(recs) if "optim_state_bytes" in r]
    tok = cfg["train"]["micro_batch"] * cfg["train"]["grad_accum"] * cfg["data"]["seq_len"]
    done = bool(recs) and recs[-1]["step"] >= cfg["train"]["max_steps"] and "eval_ppl" in recs[-1]
    return {"run": run, "cfg": cfg, "name": cfg["optim"]["name"], "mlr": cfg["optim"]["matrix_lr"] or cfg["optim"]["lr"],
            "lr": cfg["optim"]["lr"], "T": cfg["optim"]["update_proj_gap"], "seed": cfg["train"]["seed"],
            "final": ev[-1] if done else None, "ms": 1000 * tok / statistics.median(tps) if tps else None,
            "state": st[-1] if st else None}

def groups(infos, key):
    g = {}
    for i in infos:
        if i["final"] is not None:
            g.setdefault(key(i), []).append(i)
    return g

def stats(items):
    f = [i["final"] for i in items]
    return (statistics.fmean(f), statistics.stdev(f) if len(f) > 1 else float("nan"), min(f), max(f), len(f),
            statistics.median(i["ms"] for i in items), items[0]["state"])

def table(stage, title):
    infos = [info(r) for r in runs(stage)]
    g = groups(infos, lambda i: (ARMS.index(i["name"]) if i["name"] in ARMS else 9, i["name"], i["mlr"]))
    if not g:
        return None
    best = {}
    for (o, n, m), items in g.items():
        s = stats(items)
        if n not in best or s[0] < best[n][1][0]:
            best[n] = (m, s)
    ref = best.get("adamw", (None, (float("nan"),)))[1][0]
    print(f"\n#### {title}\n")
    print("| optimizer | matrix lr | seeds | final eval ppl mean | std | min | max | vs tuned AdamW | ms/step | optimizer state |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for (o, n, m), items in sorted(g.items()):
        mean, sd, lo, hi, k, ms, st = stats(items)
        mark = "**" if best[n][0] == m else ""
        print(f"| {n} | {m:g} | {k} | {mark}{mean:.1f}{mark} | {sd:.1f} | {lo:.1f} | {hi:.1f} | {100 * (mean / ref - 1):+.1f}% "
              f"| {ms:.0f} | {st / 2**20:.1f} MiB |")
    # paired by seed (same init and data order): each arm at its best lr against AdamW at its best lr
    by = {(i["name"], i["seed"]): i["final"] for i in infos if i["final"] is not None and i["name"] in best
          and i["mlr"] == best[i["name"]][0]}
    seeds = sorted({sd for (_, sd) in by})
    print(f"\n| optimizer (best matrix lr) | " + " | ".join(f"seed {sd}: ppl (vs AdamW)" for sd in seeds) + " |")
    print("|---|" + "---|" * len(seeds))
    for n in [a for a in ARMS if a in best]:
        cells = []
        for sd in seeds:
            v, ref_sd = by.get((n, sd)), by.get(("adamw", sd))
            cells.append("-" if v is None else f"{v:.1f}" + (f" ({100 * (v / ref_sd - 1):+.1f}%)" if ref_sd else ""))
        print(f"| {n} ({best[n][0]:g}) | " + " | ".join(cells) + " |")
    # lr sensitivity plot
    fig, ax = plt.subplots(figsize=(6, 4))
    for n in ARMS:
        pts = sorted((m, stats(items)) for (o, nn, m), items in g.items() if nn == n)
        if pts:
            xs = [p[0] for p in pts]; ys = [p[1][0] for p in pts]
            err = [[y - p[1][2] for y, p in zip(ys, pts)], [p[1][3] - y for y, p in zip(ys, pts)]]
            ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=n)
    ax.set_xscale("log"); ax.set_xlabel("matrix lr (optim.matrix_lr)"); ax.set_ylabel("final validation ppl")
    ax.set_title(f"{title.split(',')[0]}: final ppl (mean, min-max over seeds)", fontsize=9); ax.grid(alpha=.3); ax.legend()
    fig.tight_layout(); fig.savefig(DOCS / f"{stage}_lr.png", dpi=90); plt.close(fig)
    # curves at each arm's best lr
    best_runs = [i["run"] for i in infos if i["name"] in best and i["mlr"] == best[i["name"]][0]]
    compare(sorted(best_runs, key=lambda r: (ARMS.index(info(r)["name"]), str(r))), "tokens", DOCS / f"{stage}_curves.png")
    return best

def recipe_table():
    infos = [info(r) for s in ("c_recipe_adamw", "c_recipe_galore") for r in runs(s)]
    g = groups(infos, lambda i: (i["name"], i["lr"]))
    if not g:
        return
    print("\n#### (c) recipe vs recipe on tiny (200 steps of 8 x 256 tokens)\n")
    print("| recipe | lr (all parameters) | seeds | final eval ppl mean | std | min | max | ms/step | optimizer state |")
    print("|---|---|---|---|---|---|---|---|---|")
    for (n, lr), items in sorted(g.items()):
        mean, sd, lo, hi, k, ms, st = stats(items)
        label = "AdamW" if n == "adamw" else "GaLore as published (scale 0.25, rank 128, T=200)"
        print(f"| {label} | {lr:g} | {k} | {mean:.1f} | {sd:.1f} | {lo:.1f} | {hi:.1f} | {ms:.0f} | {st / 2**20:.1f} MiB |")
    compare([i["run"] for i in sorted(infos, key=lambda i: (i["name"], i["lr"], i["seed"]))], "tokens",
            DOCS / "c_recipe_curves.png")

def optimizer_times():
    """{name: (ordinary step s, refresh step s)} of the optimizer alone on the cpu model (random gradients, rank 48,
    one thread): min over repeats, the least disturbed by other load on a shared machine."""
    import torch
    from bench.projection import step_times
    from config import OptimConfig
    from model import build_model
    from optim import build_optimizer
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_model("cpu", 8192, 128)
    for q in model.parameters():
        q.grad = torch.randn_like(q) * 1e-3
    out = {}
    for name in ARMS:
        opt = build_optimizer(list(model.named_parameters()), OptimConfig(name=name, lr=1e-4, rank=48, update_proj_gap=6))
        times = [step_times(opt, 6, 5) for _ in range(3)]
        out[name] = (min(t[0] for t in times), min(t[1] for t in times) if name != "adamw" else min(t[0] for t in times))
        del opt
    return out

def gap_table():
    infos = [info(r) for r in runs("d_gap")]
    if not infos:
        return
    lrs = {i["name"]: i["mlr"] for i in infos}
    infos += [i for i in (info(r) for r in runs("a_local")) if lrs.get(i["name"]) == i["mlr"] and i["seed"] == 0]
    g = groups(infos, lambda i: (i["name"], i["T"]))
    print("\n#### (d) refresh interval T (each at its best matrix lr of (a), seed 0; T=50 from (a); 150 steps)\n")
    print("| optimizer | matrix lr | T | refreshes | final eval ppl | ms/step |")
    print("|---|---|---|---|---|---|")
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for n in ("galore", "rgp"):
        pts = sorted((T, stats(items)) for (nn, T), items in g.items() if nn == n)
        for T, s in pts:
            print(f"| {n} | {lrs[n]:g} | {T} | {len(range(0, 150, T))} | {s[0]:.1f} | {s[5]:.0f} |")
        a1.plot([p[0] for p in pts], [p[1][0] for p in pts], marker="o", label=n)
        a2.plot([p[0] for p in pts], [p[1][5] for p in pts], marker="o", label=n)
    for ax, yl in ((a1, "final validation ppl"), (a2, "ms / step (median)")):
        ax.set_xscale("log"); ax.set_xlabel("T (optim.update_proj_gap)"); ax.set_ylabel(yl); ax.grid(alpha=.3); ax.legend()
    fig.tight_layout(); fig.savefig(DOCS / "d_gap.png", dpi=90); plt.close(fig)

table("a_local", "(a) local corpus, projection isolated (cpu model, other_lr 3e-3)")
table("b_linuxdoc", "(b) second corpus (Debian kernel docs), projection isolated")
recipe_table()
gap_table()

def optimizer_table():
    ot = optimizer_times()
    print("\n#### optimizer step alone (cpu model, rank 48, one thread; min of repeats; amortized = ((T-1) step + refresh) / T)\n")
    print("| optimizer | step ms | refresh step ms | amortized T=25 | T=50 | T=200 |")
    print("|---|---|---|---|---|---|")
    for n, (st, rs) in ot.items():
        am = lambda T: 1000 * ((T - 1) * st + rs) / T  # noqa: E731
        print(f"| {n} | {1000 * st:.1f} | {1000 * rs:.1f} | {am(25):.1f} | {am(50):.1f} | {am(200):.1f} |")

optimizer_table()
PY
}

stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(other_lr a b c d e report)
for s in "${stages[@]}"; do "stage_$s"; done
