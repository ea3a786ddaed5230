#!/usr/bin/env bash
# One node, N local ranks (one per GPU, or CPU processes over gloo):
#
#   bash launch/local.sh [--nproc-per-node N] [--max-restarts K] [--] [hydra overrides...]
#   NPROC_PER_NODE=4 bash launch/local.sh attention=linear trainer.max_steps=1000
#   MAX_RESTARTS=2 bash launch/local.sh trainer.ckpt_every=100 hydra.run.dir=runs/r1
#
# Runs `torchrun --standalone -m trainer.train "$@"`: every argument after the options
# (or after `--`) is handed to Hydra untouched.
#
# Options (flag, or environment variable; a flag wins):
#   --nproc-per-node N   NPROC_PER_NODE (or NPROC)  default: one per visible GPU, else 2
#   --max-restarts K     MAX_RESTARTS               default 0. With K > 0 torchrun restarts
#                        all ranks when one fails, up to K times; unless you pass your own
#                        trainer.resume=..., `trainer.resume=auto` is added (before your
#                        overrides) so the restarted ranks continue from the latest
#                        complete checkpoint (set trainer.ckpt_every).
# Also: PYTHON, FLIGHT_RECORDER, FR_DUMP_DIR, FR_BUFFER_SIZE, DRY_RUN (launch/common.sh), which
# also sets TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 so that restarted ranks can reconnect.
# On GPUs PyTorch's NCCL flight recorder is on; dumps go to <run dir>/flight_recorder/.
# Without hydra.run.dir the run directory is runs/train/<torchrun's random run id>.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
cd "$RINGTRAIN_ROOT"

rt_node_flags "$@"
set -- "${RT_REST[@]+"${RT_REST[@]}"}"
nproc=${nproc:-$(rt_default_nproc)}

defaults=()
if [[ "$max_restarts" -gt 0 ]] && ! rt_has_override trainer.resume "$@"; then
    defaults+=(trainer.resume=auto)
fi
run_dir=$(rt_override_value hydra.run.dir "$@")
if [[ -n "$run_dir" ]]; then
    rt_flight_recorder "$run_dir/flight_recorder"
else
    rt_flight_recorder "runs/flight_recorder/$(date +%Y-%m-%d_%H-%M-%S)"
fi

rt_elastic_store
rt_exec "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node="$nproc" --max-restarts="$max_restarts" \
    -m trainer.train "${defaults[@]}" "$@"
