"""Run by torchrun under launch/emulate_cluster.sh (tests/test_emulated_cluster.py):
checks on every rank that torchrun's layout variables fit --layout NxP, does a gloo
all_reduce and an all_gather of (GROUP_RANK, LOCAL_RANK, namespace, address), and writes
OUT/rank_<r>.json (its own view, pid first in OUT/rank_<r>.pid) and, on rank 0,
OUT/result.json (the node map). Exits 1 if any check failed.

    --fail-rank R    rank R exits 1 right after init_process_group (the others then wait
                     in the all_reduce for a peer that is gone)
    --hold S         after the collectives, rank 0 creates OUT/running and every rank
                     sleeps S seconds (for a test that interrupts the run)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

SUBNET = "10.77.0"  # launch/emulate_cluster.sh: node i is SUBNET.<i+1>


def _route(addr: str) -> str:
    r = subprocess.run(["ip", "-o", "route", "get", addr], capture_output=True, text=True, timeout=30)
    return (r.stdout or r.stderr).strip()


def _own_address(master: str) -> str:
    """The local address this node uses toward the master (UDP connect sends nothing)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((master, 9))
        return s.getsockname()[0]


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--layout", required=True, help="NNODESxNPROC, what the launch was asked for")
    p.add_argument("--fail-rank", type=int, default=-1)
    p.add_argument("--hold", type=float, default=0.0)
    a = p.parse_args()
    a.nnodes, a.nproc = map(int, a.layout.split("x"))
    env = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK",
                                          "GROUP_WORLD_SIZE", "MASTER_ADDR", "RINGTRAIN_EMULATED_NODE",
                                          "GLOO_SOCKET_IFNAME")}
    rank = int(env["RANK"])
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / f"rank_{rank}.pid").write_text(str(os.getpid()))
    errors: list[str] = []

    def check(ok: bool, what: str) -> None:
        if not ok:
            errors.append(what)

    world, local, local_world = int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"]), int(env["LOCAL_WORLD_SIZE"])
    group, groups, node = int(env["GROUP_RANK"]), int(env["GROUP_WORLD_SIZE"]), int(env["RINGTRAIN_EMULATED_NODE"])
    check(world == a.nnodes * a.nproc, f"WORLD_SIZE {world} != {a.nnodes} x {a.nproc}")
    check(local_world == a.nproc, f"LOCAL_WORLD_SIZE {local_world} != {a.nproc}")
    check(groups == a.nnodes, f"GROUP_WORLD_SIZE {groups} != {a.nnodes}")
    check(0 <= local < a.nproc, f"LOCAL_RANK {local} not in [0, {a.nproc})")
    check(0 <= group < a.nnodes, f"GROUP_RANK {group} not in [0, {a.nnodes})")
    check(rank == group * a.nproc + local, f"RANK {rank} != GROUP_RANK {group} x {a.nproc} + LOCAL_RANK {local}")
    check(0 <= node < a.nnodes, f"RINGTRAIN_EMULATED_NODE {node} not in [0, {a.nnodes})")
    addr = _own_address(env["MASTER_ADDR"])
    check(addr == f"{SUBNET}.{node + 1}", f"own address {addr}, expected {SUBNET}.{node + 1}")
    mine = {"rank": rank, "pid": os.getpid(), "env": env, "address": addr}
    if local == 0:  # the node's own address goes over lo; another node's over eth0
        other = f"{SUBNET}.{(node + 1) % a.nnodes + 1}"
        mine["route_self"], mine["route_other"] = _route(addr), _route(other)

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    if rank == a.fail_rank:
        print(f"probe rank {rank}: exiting 1 as told", flush=True)
        return 1
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    want = world * (world + 1) / 2
    check(t.item() == want, f"all_reduce gave {t.item()}, expected {want}")
    me = torch.tensor([group, local, node, rank, int(addr.rsplit(".", 1)[1])], dtype=torch.int64)
    rows = [torch.zeros_like(me) for _ in range(world)]
    dist.all_gather(rows, me)
    gathered = [r.tolist() for r in rows]
    mine.update(all_reduce=t.item(), errors=errors)

    if rank == 0:
        node_map: dict[int, dict] = {}
        for g, lr, n, r, octet in gathered:
            check(r == g * a.nproc + lr, f"rank {r}: GROUP_RANK {g}, LOCAL_RANK {lr}")
            entry = node_map.setdefault(g, {"namespaces": set(), "octets": set(), "local_ranks": []})
            entry["namespaces"].add(n)
            entry["octets"].add(octet)
            entry["local_ranks"].append(lr)
        check(sorted(node_map) == list(range(a.nnodes)), f"GROUP_RANKs {sorted(node_map)}")
        for g, entry in node_map.items():
            check(sorted(entry["local_ranks"]) == list(range(a.nproc)), f"node {g}: local ranks {entry['local_ranks']}")
            check(len(entry["namespaces"]) == 1 and len(entry["octets"]) == 1,
                  f"node {g} spans namespaces {entry['namespaces']} / addresses {entry['octets']}")
        spans = [min(e["namespaces"]) for e in node_map.values()]
        check(sorted(spans) == list(range(a.nnodes)), f"node ranks to namespaces: {spans}")
        result = {"world_size": world, "all_reduce": t.item(), "gathered": gathered,
                  "node_of_group": {str(g): min(e["namespaces"]) for g, e in node_map.items()}, "errors": errors}
        (a.out / "result.json").write_text(json.dumps(result, indent=1))
    (a.out / f"rank_{rank}.json").write_text(json.dumps(mine, indent=1))

    if a.hold > 0:
        dist.barrier()
        if rank == 0:
            (a.out / "running").write_text("1")
        time.sleep(a.hold)
    dist.barrier()
    dist.destroy_process_group()
    print(f"probe rank {rank}: {'ok' if not errors else errors}", flush=True)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
