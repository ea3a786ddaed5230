#!/usr/bin/env bash
# One node, N local ranks (GPUs or CPU processes):
#   NPROC=4 bash launch/local.sh attention=linear trainer.max_steps=1000
set -euo pipefail
cd "$(dirname "$0")/.."
exec python3 -m torch.distributed.run --standalone --nproc_per_node="${NPROC:-2}" -m trainer.train "$@"
