#!/usr/bin/env bash
# Run the same command on every node (a shared filesystem holds the run directory):
#   NNODES=2 NPROC=8 MASTER_ADDR=node0 RUN_ID=exp42 bash launch/multinode.sh attention=gau
# torchrun's c10d rendezvous assigns node ranks; RUN_ID names both the rendezvous and
# the run directory, so every rank of every node writes into the same one and a
# relaunch with the same RUN_ID and trainer.resume=auto continues the run.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${NNODES:?set NNODES}" "${MASTER_ADDR:?set MASTER_ADDR}" "${RUN_ID:?set RUN_ID}"
exec python3 -m torch.distributed.run --nnodes="$NNODES" --nproc_per_node="${NPROC:-8}" \
    --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:${MASTER_PORT:-29500}" --rdzv_id="$RUN_ID" \
    -m trainer.train hydra.run.dir="runs/train/$RUN_ID" trainer.resume=auto "$@"
