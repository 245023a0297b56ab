#!/usr/bin/env bash
# Multi-node torchrun: run the same command on every node with its NODE_RANK.
# Usage: NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 [MASTER_PORT=29500] [NGPU=8] \
#        bash launch/torchrun_multinode.sh RECIPE.toml [--section.key=value ...]
set -euo pipefail
cd "$(dirname "$0")/.."
: "${NNODES:?set NNODES}" "${NODE_RANK:?set NODE_RANK}" "${MASTER_ADDR:?set MASTER_ADDR}"
source launch/_recipe.sh "$@"
validate $((NNODES * ${NGPU:-8}))
exec torchrun --nnodes="$NNODES" --node_rank="$NODE_RANK" --nproc_per_node="${NGPU:-8}" \
    --master_addr="$MASTER_ADDR" --master_port="${MASTER_PORT:-29500}" \
    train.py --config "$RECIPE" --train.resume=auto "${OVERRIDES[@]}"
