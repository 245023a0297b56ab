#!/usr/bin/env bash
# Multi-node torchrun: run the same command on every node with its NODE_RANK.
# Usage: NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 [MASTER_PORT=29500] [NGPU=8] \
#        CONFIG=configs/runs/c4_llama_1b.toml launch/torchrun_multinode.sh [--section.key=value ...]
set -euo pipefail
cd "$(dirname "$0")/.."
: "${NNODES:?set NNODES}" "${NODE_RANK:?set NODE_RANK}" "${MASTER_ADDR:?set MASTER_ADDR}"
MASTER_PORT=${MASTER_PORT:-29500}
NGPU=${NGPU:-8}
CONFIG=${CONFIG:-configs/runs/c4_llama_1b.toml}
exec torchrun --nnodes="$NNODES" --node_rank="$NODE_RANK" --nproc_per_node="$NGPU" \
    --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT" \
    train.py --config "$CONFIG" --train.resume=auto "$@"
