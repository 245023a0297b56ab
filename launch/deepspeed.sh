#!/usr/bin/env bash
# DeepSpeed launcher, resuming automatically. DS_CONFIG picks the ZeRO stage and precision
# (configs/deepspeed/README.md); batch size, accumulation and clipping come from the recipe.
# Usage: [HOSTFILE=launch/hostfile | NGPU=8] [DS_CONFIG=configs/deepspeed/zero1.json] \
#        bash launch/deepspeed.sh RECIPE.toml [--section.key=value ...]
#   e.g. HOSTFILE=launch/hostfile bash launch/deepspeed.sh configs/runs/c4_llama_1b.toml
#        DS_ACCELERATOR=cpu NGPU=2 DS_CONFIG=configs/deepspeed/zero2_cpu.json \
#            bash launch/deepspeed.sh configs/runs/tiny_cpu.toml --train.max_steps=20     (CPU, gloo)
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/_recipe.sh "$@"
DS_CONFIG=${DS_CONFIG:-configs/deepspeed/zero2.json}
if [[ -n "${HOSTFILE:-}" ]]; then
    hosts=(--hostfile "$HOSTFILE")
    world=$(awk '{for (i = 1; i <= NF; i++) if ($i ~ /^slots=/) {split($i, a, "="); n += a[2]}} END {print n}' "$HOSTFILE")
else
    hosts=(--num_gpus "${NGPU:-1}")
    world=${NGPU:-1}
fi
validate "$world" --deepspeed "$DS_CONFIG"
exec deepspeed "${hosts[@]}" --master_port "${MASTER_PORT:-29500}" \
    train.py --config "$RECIPE" --deepspeed "$DS_CONFIG" --train.resume=auto "${OVERRIDES[@]}"
