#!/usr/bin/env bash
# Hugging Face Accelerate as the launcher and the engine (`engine=accelerate`: Accelerate's
# DDP, or FSDP for parallel=zero2 / zero3 on GPUs), for comparison with ringtrain's own:
#
#   bash launch/accelerate.sh [--nproc-per-node P] [--max-restarts K] [--] [hydra overrides...]
#   bash launch/accelerate.sh model=tiny trainer.max_steps=50 hydra.run.dir=runs/acc
#   # two nodes: run on each, NODE_RANK 0 and 1 (Accelerate's default rendezvous is static)
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 bash launch/accelerate.sh parallel=zero3
#
# What it runs (the same by hand; --num_processes counts ALL processes of all machines,
# and --multi_gpu also starts several CPU processes over gloo when there is no GPU):
#   accelerate launch --multi_gpu --num_machines 1 --num_processes 2 --main_process_port 0 \
#       --mixed_precision no --dynamo_backend no -m trainer.train engine=accelerate [overrides]
# (`--mixed_precision no` only quiets Accelerate's "defaults" warning: the trainer passes
# precision=... to Accelerator itself.) `engine=accelerate` comes before your overrides,
# which reach Hydra untouched.
#
# Options (flag, or environment variable; a flag wins):
#   --nproc-per-node P   NPROC_PER_NODE (or NPROC): processes on this machine; default one
#                        per visible GPU, else 2
#   --max-restarts K     MAX_RESTARTS, default 0 (with K > 0, trainer.resume=auto is added
#                        unless you pass trainer.resume=...)
#   NNODES (1), NODE_RANK (0), MASTER_ADDR (required when NNODES > 1), MASTER_PORT
#   (29500 for several machines; a free port on one), RDZV_BACKEND (static, or c10d),
#   RUN_ID (rendezvous id and run directory runs/train/$RUN_ID; default accelerate_<time>)
# Also: PYTHON, FLIGHT_RECORDER, FR_DUMP_DIR, FR_BUFFER_SIZE, DRY_RUN (launch/common.sh), which
# also sets TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 so that restarted ranks can reconnect.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
cd "$RINGTRAIN_ROOT"

rt_node_flags "$@"
set -- "${RT_REST[@]+"${RT_REST[@]}"}"
nnodes=${NNODES:-1}
[[ "$nnodes" =~ ^[1-9][0-9]*$ ]] || rt_die "NNODES must be a positive integer for accelerate launch, got '$nnodes'"
if [[ -z "$nproc" ]]; then
    if rt_gpu_present; then
        nproc=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')
    else
        nproc=2
    fi
fi
[[ "$nproc" =~ ^[1-9][0-9]*$ ]] || rt_die "processes per node must be a positive integer, got '$nproc'"

args=(--num_machines "$nnodes" --num_processes "$((nnodes * nproc))" --max_restarts "$max_restarts"
      --mixed_precision no --dynamo_backend no)
if [[ $((nnodes * nproc)) -gt 1 ]]; then args+=(--multi_gpu); fi
if [[ "$nnodes" -gt 1 ]]; then
    [[ -n "${MASTER_ADDR:-}" ]] || rt_die "NNODES=$nnodes needs MASTER_ADDR (the first machine's address)"
    args+=(--machine_rank "${NODE_RANK:-0}" --main_process_ip "$MASTER_ADDR" --main_process_port "${MASTER_PORT:-29500}"
           --rdzv_backend "${RDZV_BACKEND:-static}")
else
    args+=(--main_process_port "${MASTER_PORT:-0}")  # 0: a free port
fi

# torchrun (inside accelerate launch) reads its run id from PET_RDZV_ID and exports it as
# TORCHELASTIC_RUN_ID, which names Hydra's default run directory runs/train/<id>;
# without it every accelerate run would share runs/train/none
rt_export PET_RDZV_ID "${RUN_ID:-accelerate_$(date +%Y-%m-%d_%H-%M-%S)}"
defaults=(engine=accelerate)
if [[ "$max_restarts" -gt 0 ]] && ! rt_has_override trainer.resume "$@"; then
    defaults+=(trainer.resume=auto)
fi
run_dir=$(rt_override_value hydra.run.dir "$@")
rt_flight_recorder "${run_dir:-runs/train/$PET_RDZV_ID}/flight_recorder"

rt_elastic_store
rt_exec "$PYTHON" -m accelerate.commands.launch "${args[@]}" -m trainer.train "${defaults[@]}" "$@"
