#!/usr/bin/env bash
# An emulated cluster on this one machine: N "nodes" (network namespaces) joined by a
# software switch, every link shaped to RATE in both directions, one torchrun agent per
# node. Needs root (network namespaces), `ip` and `tc` (iproute2).
#
#   bash launch/emulate_cluster.sh --nnodes N --nproc-per-node P --link-rate RATE \
#       [--mtu M] [--port PORT] [--burst BYTES] [--inspect] [--] <torchrun command...>
#
#   bash launch/emulate_cluster.sh --nnodes 2 --nproc-per-node 2 --link-rate 2gbit \
#       -m parallel.bench ops=[all_reduce] algorithms=[ring,native]
#
# Every argument after the options (or after `--`) is appended to torchrun's own arguments:
# a script path or `-m module`, then its arguments (torchrun flags such as --tee 3 may
# come first). The caller's environment and working directory are kept; the interpreter
# is PYTHON, else `python` from PATH.
#
# Options:
#   --nnodes N           nodes (network namespaces), 1..250 (required)
#   --nproc-per-node P   ranks per node, >= 1 (required)
#   --link-rate RATE     each node's link, each way, in tc's units: 500mbit, 2gbit,
#                        100mbps (= bytes/s), ... (required)
#   --mtu M              MTU of every link (default 1500)
#   --port PORT          rendezvous port on node 0's address (default 29400)
#   --burst BYTES        tbf bucket size (default: see "Shaping" below)
#   --inspect            print addresses and `tc -s qdisc` of every namespace before the
#                        command runs and again after it ends
#
# What it builds (nothing in the root namespace; no traffic leaves the machine):
#   <prefix>-sw          the switch: bridge br0, one port v<i> per node
#   <prefix>-n<i>        node i: lo, and eth0 at 10.77.0.<i+1>/24, a veth to v<i>
# with <prefix> = rt<pid of this script>. Ranks of one node talk over the namespace's
# loopback (the kernel routes a node's own address via lo); only traffic between nodes
# crosses the shaped veths.
#
# Shaping: a tbf qdisc on both ends of every veth (node -> switch on eth0, switch -> node
# on v<i>). The bucket is rate/HZ bytes (the data one timer tick may release; a smaller
# one loses tokens whenever the dequeue timer fires late, as on a busy machine) and at
# least 128 KiB, two of the 64 KiB GSO packets a veth carries (a smaller bucket makes tbf
# split every one of them, which costs CPU and rate). The queue holds 10 ms at RATE on
# top of the bucket. HZ is CONFIG_HZ from the kernel config, 100 if it is not readable.
#
# The agents meet through c10d rendezvous at 10.77.0.1:PORT (node 0 hosts the store);
# torchrun gives node ranks (GROUP_RANK) itself, so node i is not necessarily GROUP_RANK i;
# RINGTRAIN_EMULATED_NODE=i tells a worker which namespace it is in. Exported for the
# agents: GLOO_SOCKET_IFNAME=eth0 (and NCCL_ / TP_SOCKET_IFNAME), so collectives bind the
# node's own address, and TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (launch/common.sh).
# Output lines are prefixed [node<i>].
#
# Exit status: the first non-zero exit status of an agent (the others are then stopped at
# once), else 0; 2 for a usage or setup error; 130 / 143 after SIGINT / SIGTERM. On every
# exit every process in the namespaces is stopped (SIGTERM, then SIGKILL after a few
# seconds; workers included) and every namespace it created is deleted.
set -euo pipefail
emu_python=${PYTHON:-python}
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

SUBNET=10.77.0
GRACE_S=5  # SIGTERM -> SIGKILL

nnodes= nproc= rate= mtu=1500 port=29400 burst= inspect=0
while [[ $# -gt 0 ]]; do
    opt=${1%%=*}
    case "$opt" in
        --nnodes | --nproc-per-node | --nproc_per_node | --link-rate | --link_rate | --mtu | --port | --burst)
            if [[ "$1" == *=* ]]; then
                value=${1#*=}
                shift
            else
                [[ $# -ge 2 && -n "$2" && "$2" != -- ]] || rt_die "$opt needs a value"
                value=$2
                shift 2
            fi
            [[ -n "$value" ]] || rt_die "$opt needs a value"
            case "${opt//_/-}" in
                --nnodes) nnodes=$value ;;
                --nproc-per-node) nproc=$value ;;
                --link-rate) rate=$value ;;
                --mtu) mtu=$value ;;
                --port) port=$value ;;
                --burst) burst=$value ;;
            esac ;;
        --inspect) inspect=1; shift ;;
        --) shift; break ;;
        *) break ;;
    esac
done

[[ -n "$nnodes" ]] || rt_die "--nnodes is required (the number of emulated nodes)"
[[ "$nnodes" =~ ^[0-9]+$ ]] && (( 10#$nnodes >= 1 && 10#$nnodes <= 250 )) ||
    rt_die "--nnodes must be an integer from 1 to 250, got '$nnodes'"
[[ -n "$nproc" ]] || rt_die "--nproc-per-node is required (ranks per node)"
[[ "$nproc" =~ ^[0-9]+$ ]] && (( 10#$nproc >= 1 )) ||
    rt_die "--nproc-per-node must be an integer >= 1, got '$nproc'"
[[ -n "$rate" ]] || rt_die "--link-rate is required (e.g. 1gbit, 500mbit)"
[[ "$mtu" =~ ^[0-9]+$ ]] && (( 10#$mtu >= 68 && 10#$mtu <= 65535 )) ||
    rt_die "--mtu must be an integer from 68 to 65535, got '$mtu'"
[[ "$port" =~ ^[0-9]+$ ]] && (( 10#$port >= 1 && 10#$port <= 65535 )) ||
    rt_die "--port must be an integer from 1 to 65535, got '$port'"
[[ -z "$burst" || "$burst" =~ ^[0-9]+$ ]] || rt_die "--burst must be a number of bytes, got '$burst'"
nnodes=$((10#$nnodes)) nproc=$((10#$nproc)) mtu=$((10#$mtu)) port=$((10#$port))
[[ $# -gt 0 ]] || rt_die "no command to run (give a script or -m module after the options)"

# bytes per second, as tc reads RATE (a bare number is bit/s; units case-insensitive)
rate_bps=$(awk -v r="$rate" 'BEGIN {
    if (!match(r, /^[0-9]+(\.[0-9]+)?/)) exit 1
    n = substr(r, 1, RLENGTH) + 0; u = tolower(substr(r, RLENGTH + 1))
    s["bit"] = 1; s["kibit"] = 1024; s["kbit"] = 1e3; s["mibit"] = 2^20; s["mbit"] = 1e6
    s["gibit"] = 2^30; s["gbit"] = 1e9; s["tibit"] = 2^40; s["tbit"] = 1e12
    s["bps"] = 8; s["kibps"] = 8 * 1024; s["kbps"] = 8e3; s["mibps"] = 8 * 2^20; s["mbps"] = 8e6
    s["gibps"] = 8 * 2^30; s["gbps"] = 8e9; s["tibps"] = 8 * 2^40; s["tbps"] = 8e12
    if (u == "") f = 1; else if (u in s) f = s[u]; else exit 1
    b = n * f / 8
    if (b < 1) exit 1
    printf "%.0f\n", b
}') || rt_die "--link-rate '$rate' is not a rate tc accepts (e.g. 1gbit, 500mbit, 100mbps)"

[[ $EUID -eq 0 ]] || rt_die "needs root to create network namespaces (run as root or with sudo)"
for tool in ip tc setsid; do
    command -v "$tool" >/dev/null 2>&1 || rt_die "needs '$tool' on PATH (iproute2 / util-linux)"
done
py=$(command -v "$emu_python") || rt_die "no '$emu_python' on PATH (set PYTHON)"

hz=$( { zcat /proc/config.gz 2>/dev/null || cat "/boot/config-$(uname -r)" 2>/dev/null; } |
      sed -n 's/^CONFIG_HZ=\([0-9][0-9]*\)$/\1/p') || true
hz=${hz%%$'\n'*}
[[ "${hz:-0}" -gt 0 ]] 2>/dev/null || hz=100
if [[ -z "$burst" ]]; then
    burst=$(( (rate_bps + hz - 1) / hz ))
    (( burst >= 131072 )) || burst=131072
fi
(( burst >= mtu + 14 )) || rt_die "--burst must hold a full frame (>= $((mtu + 14)) bytes), got $burst"
limit=$(( burst + (rate_bps + 99) / 100 ))

prefix=rt$$
if ip netns list 2>/dev/null | grep -q "^$prefix-"; then  # left over by a killed run with our pid
    prefix=rt$$x$RANDOM
fi
switch=$prefix-sw
nodes=()
for ((i = 0; i < nnodes; i++)); do nodes+=("$prefix-n$i"); done
created=()       # namespaces made so far, switch first
agents=()        # agent pids (each the leader of its own session and process group)
prefixers=()     # the output prefixers' pids
workdir=
finished=0

emu_ns_pids() {  # the pids of every process in our namespaces
    local ns
    for ns in "${created[@]+"${created[@]}"}"; do
        ip netns pids "$ns" 2>/dev/null || true
    done
}

emu_cleanup() {  # stop everything, delete every namespace; idempotent, never fails
    (( finished == 0 )) || return 0
    finished=1
    set +e
    local pid ns left t
    for pid in "${agents[@]+"${agents[@]}"}"; do kill -TERM -- "-$pid" 2>/dev/null; done
    left=$(emu_ns_pids)
    [[ -z "$left" ]] || kill -TERM $left 2>/dev/null
    for ((t = 0; t < GRACE_S * 10; t++)); do
        left=$(emu_ns_pids)
        [[ -n "$left" ]] || break
        sleep 0.1
    done
    for ((t = 0; t < 50; t++)); do  # SIGKILL whatever is left, until nothing is
        for pid in "${agents[@]+"${agents[@]}"}"; do kill -KILL -- "-$pid" 2>/dev/null; done
        left=$(emu_ns_pids)
        [[ -n "$left" ]] || break
        kill -KILL $left 2>/dev/null
        sleep 0.1
    done
    [[ -z "$left" ]] || echo "$(basename "$0"): processes still in the namespaces: $left" >&2
    for pid in "${agents[@]+"${agents[@]}"}"; do wait "$pid" 2>/dev/null; done
    for ((t = 0; t < 20; t++)); do  # the prefixers end once every writer is gone
        left=
        for pid in "${prefixers[@]+"${prefixers[@]}"}"; do
            kill -0 "$pid" 2>/dev/null && left+=" $pid"
        done
        [[ -n "$left" ]] || break
        sleep 0.1
    done
    [[ -z "$left" ]] || kill $left 2>/dev/null
    for ((t = ${#created[@]} - 1; t >= 0; t--)); do  # nodes first (their veths go too), the switch last
        ip netns del "${created[t]}" 2>/dev/null ||
            echo "$(basename "$0"): could not delete namespace ${created[t]}" >&2
    done
    [[ -z "$workdir" ]] || rm -rf "$workdir"
}

emu_signal() {  # emu_signal STATUS: the trap for SIGINT / SIGTERM
    trap '' INT TERM
    echo "$(basename "$0"): interrupted, stopping the agents and removing the namespaces" >&2
    emu_cleanup
    exit "$1"
}

emu_fail() {  # emu_fail MESSAGE: one line, clean up, exit 2
    echo "$(basename "$0"): $*" >&2
    emu_cleanup
    exit 2
}

emu() {  # emu COMMAND...: a setup step; its error output on one line if it fails
    local err
    err=$("$@" 2>&1 >/dev/null) || emu_fail "setup failed: $*: ${err//$'\n'/ }"
}

trap 'emu_cleanup' EXIT
trap 'emu_signal 130' INT
trap 'emu_signal 143' TERM

shape() {  # shape NS DEV: tbf on DEV's egress
    local err
    err=$(tc -n "$1" qdisc replace dev "$2" root tbf rate "$rate" burst "$burst" limit "$limit" 2>&1) ||
        emu_fail "--link-rate '$rate' (burst $burst, limit $limit): tc rejects it: ${err//$'\n'/ }"
}

err=$(ip netns add "$switch" 2>&1) || emu_fail "cannot create network namespace $switch: ${err//$'\n'/ }"
created+=("$switch")
emu ip -n "$switch" link set lo up
emu ip -n "$switch" link add br0 mtu "$mtu" type bridge stp_state 0 forward_delay 0
emu ip -n "$switch" link set br0 up
for ((i = 0; i < nnodes; i++)); do
    ns=${nodes[i]}
    emu ip netns add "$ns"
    created+=("$ns")
    emu ip -n "$ns" link set lo up
    emu ip -n "$switch" link add "v$i" mtu "$mtu" type veth peer name eth0 netns "$ns" mtu "$mtu"
    emu ip -n "$switch" link set "v$i" master br0
    emu ip -n "$switch" link set "v$i" up
    ip netns exec "$ns" sysctl -qw net.ipv6.conf.eth0.disable_ipv6=1 >/dev/null 2>&1 || true  # IPv4 only
    emu ip -n "$ns" addr add "$SUBNET.$((i + 1))/24" dev eth0
    emu ip -n "$ns" link set eth0 up
    shape "$ns" eth0
    shape "$switch" "v$i"
done

inspect_all() {  # inspect_all WHEN: addresses and qdisc statistics of every namespace
    local ns i
    echo "# inspect ($1): tc -s qdisc, every namespace"
    for ((i = 0; i < nnodes; i++)); do
        ns=${nodes[i]}
        echo "# ns $ns: $(ip -n "$ns" -4 -o addr show dev eth0 | awk '{print $2, $4}')" \
             "mtu $(ip -n "$ns" -o link show dev eth0 | sed -n 's/.* mtu \([0-9]*\) .*/\1/p')"
        tc -n "$ns" -s qdisc show dev eth0 | sed "s/^/# ns $ns eth0: /"
    done
    for ((i = 0; i < nnodes; i++)); do
        tc -n "$switch" -s qdisc show dev "v$i" | sed "s/^/# ns $switch v$i: /"
    done
}

rt_elastic_store
export GLOO_SOCKET_IFNAME=eth0 NCCL_SOCKET_IFNAME=eth0 TP_SOCKET_IFNAME=eth0
run_id=emu-$$-$RANDOM$RANDOM
endpoint=$SUBNET.1:$port
last=$((nnodes - 1))
echo "# emulated cluster: $nnodes node(s) x $nproc rank(s), links $rate each way (tbf burst ${burst}b" \
     "limit ${limit}b, HZ $hz, mtu $mtu), namespaces ${nodes[0]}..n$last + $switch," \
     "rendezvous $endpoint id $run_id"
(( inspect == 0 )) || inspect_all "before the run"

workdir=$(mktemp -d "${TMPDIR:-/tmp}/emulate_cluster.XXXXXX")
declare -A node_of=()
for ((i = 0; i < nnodes; i++)); do
    mkfifo "$workdir/out$i" "$workdir/err$i"
    sed -u "s/^/[node$i] /" <"$workdir/out$i" &
    prefixers+=($!)
    sed -u "s/^/[node$i] /" <"$workdir/err$i" >&2 &
    prefixers+=($!)
    is_host=$([[ $i -eq 0 ]] && echo 1 || echo 0)
    RINGTRAIN_EMULATED_NODE=$i setsid ip netns exec "${nodes[i]}" "$py" -m torch.distributed.run \
        --nnodes="$nnodes" --nproc-per-node="$nproc" --rdzv-backend=c10d --rdzv-endpoint="$endpoint" \
        --rdzv-id="$run_id" --rdzv-conf="is_host=$is_host" --local-addr="$SUBNET.$((i + 1))" \
        "$@" <"/dev/null" >"$workdir/out$i" 2>"$workdir/err$i" &
    agents+=($!)
    node_of[$!]=$i
done

status=0
running=("${agents[@]}")
while [[ ${#running[@]} -gt 0 ]]; do
    done_pid= rc=0
    wait -n -p done_pid "${running[@]}" || rc=$?
    [[ -n "$done_pid" ]] || continue
    still=()
    for pid in "${running[@]}"; do [[ $pid == "$done_pid" ]] || still+=("$pid"); done
    running=("${still[@]+"${still[@]}"}")
    if [[ $rc -ne 0 ]]; then
        echo "$(basename "$0"): node${node_of[$done_pid]}'s agent exited with status $rc; stopping the others" >&2
        status=$rc
        break
    fi
done
(( inspect == 0 )) || inspect_all "after the run"
emu_cleanup
exit "$status"
