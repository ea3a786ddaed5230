# Shared by the launch scripts (sourced, never run on its own). Bash only.
#
# Environment read here (all optional):
#   PYTHON           interpreter that runs torchrun / accelerate (default python3)
#   FLIGHT_RECORDER  auto (default: on when a GPU is present) | 1 (always) | 0 (never)
#   FR_BUFFER_SIZE   flight-recorder ring-buffer entries per rank (default 2000)
#   FR_DUMP_DIR      where the per-rank dumps go (default <run dir>/flight_recorder)
#   DRY_RUN=1        print the environment the script sets and the command, run nothing
#
# Always exported (unless already set): TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, see
# rt_elastic_store below: without it ranks restarted by torchrun cannot reconnect.
#
# The flight recorder (PyTorch's NCCL collective trace) keeps the last FR_BUFFER_SIZE
# collectives of every rank in memory; on an NCCL watchdog timeout each rank dumps them
# to FR_DUMP_DIR/rank_<r>, which `torchfrtrace FR_DUMP_DIR` (the same as `python -m
# torch.distributed.flight_recorder.fr_trace FR_DUMP_DIR`, torch >= 2.6) analyses: which
# ranks did not join which collective.
# Names as torch 2.13 reads them: TORCH_FR_BUFFER_SIZE and TORCH_FR_DUMP_TEMP_FILE (the
# flight recorder in libtorch_cpu), with the older TORCH_NCCL_TRACE_BUFFER_SIZE and
# TORCH_NCCL_DEBUG_INFO_TEMP_FILE as fallbacks (set too, for torch 2.4 - 2.5), and
# ProcessGroupNCCL's TORCH_NCCL_DUMP_ON_TIMEOUT (CUDA builds). A value already in the
# environment is never overwritten.

RINGTRAIN_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
RT_ENV=()  # the variables this script exported, for DRY_RUN

rt_export() {  # rt_export NAME VALUE: export NAME=VALUE unless NAME is already set
    local name=$1 value=$2
    if [[ -z "${!name+x}" ]]; then
        export "$name=$value"
    fi
    RT_ENV+=("$name")
}

rt_die() {
    echo "$(basename "$0"): $*" >&2
    exit 2
}

rt_gpu_present() {  # an NVIDIA GPU this node can see (nvidia-smi lists one)
    command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU '
}

rt_node_flags() {  # rt_node_flags ARGS...: the leading --nproc-per-node / --max-restarts flags
    # (defaults NPROC_PER_NODE, MAX_RESTARTS) into nproc and max_restarts; the rest, the Hydra
    # overrides, untouched into the array RT_REST
    nproc=${NPROC_PER_NODE:-${NPROC:-}}
    max_restarts=${MAX_RESTARTS:-0}
    while [[ $# -gt 0 ]]; do
        case "$1" in
            --nproc-per-node | --nproc_per_node) nproc=${2:?$1 needs a value}; shift 2 ;;
            --nproc-per-node=* | --nproc_per_node=*) nproc=${1#*=}; shift ;;
            --max-restarts | --max_restarts) max_restarts=${2:?$1 needs a value}; shift 2 ;;
            --max-restarts=* | --max_restarts=*) max_restarts=${1#*=}; shift ;;
            --) shift; break ;;
            *) break ;;
        esac
    done
    RT_REST=("$@")
    [[ "$max_restarts" =~ ^[0-9]+$ ]] || rt_die "max restarts must be a non-negative integer, got '$max_restarts'"
}

rt_default_nproc() {  # one process per visible GPU (torchrun's "gpu"), else 2 CPU processes
    if rt_gpu_present; then echo gpu; else echo 2; fi
}

rt_override_value() {  # rt_override_value KEY ARGS...: the value of the last KEY=VALUE override
    local key=$1 arg value=
    shift
    for arg in "$@"; do
        case "$arg" in
            "$key="* | "+$key="* | "++$key="*) value=${arg#*=} ;;
        esac
    done
    [[ -z "$value" ]] || echo "$value"
}

rt_has_override() {  # rt_has_override KEY ARGS...: does any override set KEY?
    local key=$1 arg
    shift
    for arg in "$@"; do
        case "$arg" in
            "$key="* | "+$key="* | "++$key="* | "~$key" | "~$key="*) return 0 ;;
        esac
    done
    return 1
}

rt_flight_recorder() {  # rt_flight_recorder DEFAULT_DUMP_DIR
    local mode=${FLIGHT_RECORDER:-auto}
    case "$mode" in
        0 | off | false) return 0 ;;
        auto) rt_gpu_present || return 0 ;;
        1 | on | true) ;;
        *) rt_die "FLIGHT_RECORDER=$mode: expected auto, 1 or 0" ;;
    esac
    local dir=${FR_DUMP_DIR:-$1} size=${FR_BUFFER_SIZE:-2000}
    [[ "$dir" == /* ]] || dir="$PWD/$dir"
    [[ "${DRY_RUN:-0}" == 1 ]] || mkdir -p "$dir"
    rt_export TORCH_FR_BUFFER_SIZE "$size"
    rt_export TORCH_NCCL_TRACE_BUFFER_SIZE "$size"
    rt_export TORCH_NCCL_DUMP_ON_TIMEOUT 1
    rt_export TORCH_FR_DUMP_TEMP_FILE "$dir/rank_"
    rt_export TORCH_NCCL_DEBUG_INFO_TEMP_FILE "$dir/rank_"
}

rt_elastic_store() {
    # torchrun >= 2.5 shares its rendezvous TCPStore with the workers' init_process_group,
    # with no per-attempt key prefix: ranks restarted after a failure (--max-restarts, or a
    # node joining an elastic job) read the dead attempt's gloo / NCCL addresses and fail
    # to connect (pytorch/pytorch#135712, #167288; seen here with torch 2.13 and gloo).
    # With sharing off, rank 0 of every attempt hosts a fresh store, as before torch 2.5.
    rt_export TORCH_DISABLE_SHARE_RDZV_TCP_STORE 1
}

rt_exec() {  # rt_exec COMMAND...: run it in place of this shell (or print it with DRY_RUN=1)
    if [[ "${DRY_RUN:-0}" == 1 ]]; then
        local name
        for name in "${RT_ENV[@]}"; do
            printf 'export %s=%q\n' "$name" "${!name}"
        done
        printf '%q ' "$@"
        printf '\n'
        exit 0
    fi
    exec "$@"
}
