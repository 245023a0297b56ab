#!/usr/bin/env bash
# DeepSpeed launcher over the hosts in HOSTFILE (see launch/hostfile.example); ZeRO-2 semantics by default.
# Micro batch, accumulation, clipping and bf16 come from DS_CONFIG (optim/deepspeed_glue.py).
# Usage: HOSTFILE=launch/hostfile CONFIG=configs/runs/c4_llama_1b.toml [DS_CONFIG=configs/deepspeed/zero1.json] \
#        launch/deepspeed.sh [--section.key=value ...]
# One machine without a hostfile: NGPU=2 launch/deepspeed.sh   (CPU: DS_ACCELERATOR=cpu)
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${CONFIG:-configs/runs/tiny_cpu.toml}
DS_CONFIG=${DS_CONFIG:-configs/deepspeed/zero2.json}
if [[ -n "${HOSTFILE:-}" ]]; then
    hosts=(--hostfile "$HOSTFILE")
else
    hosts=(--num_gpus "${NGPU:-1}")
fi
exec deepspeed "${hosts[@]}" --master_port "${MASTER_PORT:-29500}" \
    train.py --config "$CONFIG" --deepspeed "$DS_CONFIG" --train.resume=auto "$@"
