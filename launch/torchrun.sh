#!/usr/bin/env bash
# Single node, NGPU processes (CPU: gloo ranks), resuming automatically from the newest checkpoint.
# Usage: NGPU=8 CONFIG=configs/runs/c4_llama_1b.toml launch/torchrun.sh [--section.key=value ...]
set -euo pipefail
cd "$(dirname "$0")/.."
NGPU=${NGPU:-1}
CONFIG=${CONFIG:-configs/runs/tiny_cpu.toml}
exec torchrun --standalone --nnodes=1 --nproc_per_node="$NGPU" \
    train.py --config "$CONFIG" --train.resume=auto "$@"
