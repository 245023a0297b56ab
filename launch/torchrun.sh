#!/usr/bin/env bash
# Single node, NGPU processes (CPU: gloo ranks), resuming automatically from the newest checkpoint.
# Usage: [NGPU=8] bash launch/torchrun.sh RECIPE.toml [--section.key=value ...]
#   e.g. NGPU=8 bash launch/torchrun.sh configs/runs/c4_llama_60m.toml
#        NGPU=2 bash launch/torchrun.sh configs/runs/tiny_cpu.toml --train.max_steps=20     (CPU, gloo)
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/_recipe.sh "$@"
validate "${NGPU:-1}"
exec torchrun --standalone --nnodes=1 --nproc_per_node="${NGPU:-1}" \
    train.py --config "$RECIPE" --train.resume=auto "${OVERRIDES[@]}"
