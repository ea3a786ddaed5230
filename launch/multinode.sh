#!/usr/bin/env bash
# Several nodes: run the same command once on every node (one torchrun agent per node).
# The agents meet through torchrun's c10d rendezvous at HOST:PORT (a TCP store that the
# agent on HOST serves) and get their node ranks in order of arrival.
#
#   bash launch/multinode.sh [options] [--] [hydra overrides...]
#
#   # two nodes, 8 GPUs each; node0 is reachable from both:
#   NNODES=2 MASTER_ADDR=node0 RUN_ID=exp42 bash launch/multinode.sh attention=gau
#   # two agents on ONE machine (2 CPU processes each), in two shells or backgrounded:
#   NNODES=2 NPROC_PER_NODE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=29400 RUN_ID=demo \
#       bash launch/multinode.sh model=tiny trainer.max_steps=20
#
# Options (flag, or environment variable; a flag wins):
#   --nnodes N | MIN:MAX       NNODES (required). MIN:MAX is elastic membership.
#   --nproc-per-node P         NPROC_PER_NODE (or NPROC); default one per GPU, else 2
#   --rdzv-endpoint HOST:PORT  RDZV_ENDPOINT, else MASTER_ADDR:MASTER_PORT (port 29500)
#   --rdzv-id ID               RUN_ID (required): names the rendezvous and the run
#   --rdzv-backend B           RDZV_BACKEND, default c10d (or static)
#   --node-rank R              NODE_RANK: only for --rdzv-backend static, where it is
#                              required; c10d assigns node ranks itself and it is ignored
#   --max-restarts K           MAX_RESTARTS, default 0: restart every rank of every node
#                              up to K times after a failure (a rank dying, a node lost)
#   --local-addr ADDR          LOCAL_ADDR: this node's address as the other nodes reach it
#                              (default: its hostname; 127.0.0.1 when the endpoint is a
#                              loopback address, i.e. every agent is on this machine)
#   --rdzv-conf K=V,...        RDZV_CONF: e.g. join_timeout=900 (default 600 s)
# Also: PYTHON, FLIGHT_RECORDER, FR_DUMP_DIR, FR_BUFFER_SIZE, DRY_RUN (launch/common.sh), which
# also sets TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 so that restarted ranks can reconnect.
#
# Every argument after the options (or after `--`) reaches Hydra untouched; one override
# comes before them (so yours wins): `trainer.resume=auto`, unless you pass
# trainer.resume=..., so that a restart (--max-restarts) or a relaunch with the same RUN_ID
# continues from the latest complete checkpoint. Without hydra.run.dir the run directory
# is runs/train/$RUN_ID (configs/train.yaml: torchrun exports the rendezvous id as
# TORCHELASTIC_RUN_ID), relative to the repository root; it must be on a filesystem every
# node shares. On GPUs the NCCL flight recorder is on; dumps go to <run dir>/flight_recorder/.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
cd "$RINGTRAIN_ROOT"

nnodes=${NNODES:-}
nproc=${NPROC_PER_NODE:-${NPROC:-}}
endpoint=${RDZV_ENDPOINT:-}
run_id=${RUN_ID:-}
backend=${RDZV_BACKEND:-c10d}
node_rank=${NODE_RANK:-}
max_restarts=${MAX_RESTARTS:-0}
local_addr=${LOCAL_ADDR:-}
rdzv_conf=${RDZV_CONF:-}
while [[ $# -gt 0 ]]; do
    opt=${1%%=*}
    case "$opt" in
        --nnodes | --nproc-per-node | --nproc_per_node | --rdzv-endpoint | --rdzv_endpoint | --rdzv-id | \
        --rdzv_id | --rdzv-backend | --rdzv_backend | --node-rank | --node_rank | --max-restarts | \
        --max_restarts | --local-addr | --local_addr | --rdzv-conf | --rdzv_conf)
            if [[ "$1" == *=* ]]; then value=${1#*=}; shift; else value=${2:?$1 needs a value}; shift 2; fi
            case "${opt//_/-}" in
                --nnodes) nnodes=$value ;;
                --nproc-per-node) nproc=$value ;;
                --rdzv-endpoint) endpoint=$value ;;
                --rdzv-id) run_id=$value ;;
                --rdzv-backend) backend=$value ;;
                --node-rank) node_rank=$value ;;
                --max-restarts) max_restarts=$value ;;
                --local-addr) local_addr=$value ;;
                --rdzv-conf) rdzv_conf=$value ;;
            esac ;;
        --) shift; break ;;
        *) break ;;
    esac
done

[[ -n "$nnodes" ]] || rt_die "set NNODES or --nnodes (the number of nodes, or MIN:MAX)"
[[ -n "$run_id" ]] || rt_die "set RUN_ID or --rdzv-id (the same on every node)"
if [[ -z "$endpoint" ]]; then
    [[ -n "${MASTER_ADDR:-}" ]] || rt_die "set MASTER_ADDR (or RDZV_ENDPOINT / --rdzv-endpoint HOST:PORT)"
    endpoint="$MASTER_ADDR:${MASTER_PORT:-29500}"
fi
[[ "$max_restarts" =~ ^[0-9]+$ ]] || rt_die "max restarts must be a non-negative integer, got '$max_restarts'"
nproc=${nproc:-$(rt_default_nproc)}
host=${endpoint%:*}
if [[ -z "$local_addr" && ( "$host" == 127.* || "$host" == localhost ) ]]; then
    local_addr=127.0.0.1  # all agents on this machine: workers meet on loopback too
fi

args=(--nnodes="$nnodes" --nproc-per-node="$nproc" --rdzv-backend="$backend" --rdzv-endpoint="$endpoint"
      --rdzv-id="$run_id" --max-restarts="$max_restarts")
if [[ "$backend" == static ]]; then
    [[ -n "$node_rank" ]] || rt_die "--rdzv-backend static needs NODE_RANK or --node-rank"
    args+=(--node-rank="$node_rank")
fi
[[ -z "$local_addr" ]] || args+=(--local-addr="$local_addr")
[[ -z "$rdzv_conf" ]] || args+=(--rdzv-conf="$rdzv_conf")

defaults=()
rt_has_override trainer.resume "$@" || defaults+=(trainer.resume=auto)
run_dir=$(rt_override_value hydra.run.dir "$@")
rt_flight_recorder "${run_dir:-runs/train/$run_id}/flight_recorder"

rt_elastic_store
rt_exec "$PYTHON" -m torch.distributed.run "${args[@]}" -m trainer.train "${defaults[@]}" "$@"
