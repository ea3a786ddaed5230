"""Which ranks share a node, and the intra-node / inter-node process groups built from it.

A node's identity, per process, in this order: `RINGTRAIN_NODE` (set it to emulate nodes,
or where the launcher below is wrong), torchrun's `GROUP_RANK` (its node rank; every
elastic agent is one node), Slurm's `SLURM_NODEID`, else the host name. `discover_layout`
exchanges them once over the default group; nodes are numbered in order of their first
rank, and the ranks of a node keep their global order.

Hierarchical algorithms need the same number of ranks on every node: each rank's local
index picks the inter-node group it joins, and a local index missing on one node would
leave a piece without a carrier. An uneven world is refused for `hier` (the message
names the layout); `auto` then chooses among the flat algorithms only, and a subgroup
that happens to be uneven (e.g. an expert group straddling nodes) runs flat.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch.distributed as dist

NODE_ENV = "RINGTRAIN_NODE"


def node_key() -> str:
    """This process's node identity (see the module docstring)."""
    for var, prefix in ((NODE_ENV, "node"), ("GROUP_RANK", "torchrun"), ("SLURM_NODEID", "slurm")):
        if os.environ.get(var, "") != "":
            if var == "GROUP_RANK" and "TORCHELASTIC_RUN_ID" not in os.environ:
                continue  # not under torchrun: a stray variable
            return f"{prefix}:{os.environ[var]}"
    return f"host:{socket.gethostname()}"


def _ranges(ranks: list[int]) -> str:
    if len(ranks) == 1:
        return f"rank {ranks[0]}"
    if ranks == list(range(ranks[0], ranks[-1] + 1)):
        return f"ranks {ranks[0]}-{ranks[-1]}"
    return "ranks " + ",".join(map(str, ranks))


@dataclass(frozen=True)
class NodeLayout:
    """The node of every rank of a group, in group-rank order; nodes numbered 0.. by first rank."""

    node_of: tuple[int, ...]

    @classmethod
    def from_keys(cls, keys) -> "NodeLayout":
        numbers: dict = {}
        return cls(tuple(numbers.setdefault(k, len(numbers)) for k in keys))

    @classmethod
    def single(cls, world_size: int) -> "NodeLayout":
        return cls((0,) * world_size)

    @classmethod
    def regular(cls, nodes: int, ranks_per_node: int) -> "NodeLayout":
        """Node-major: rank = node * ranks_per_node + local index (torchrun's order)."""
        return cls(tuple(r // ranks_per_node for r in range(nodes * ranks_per_node)))

    @property
    def world_size(self) -> int:
        return len(self.node_of)

    @property
    def nodes(self) -> int:
        return len(set(self.node_of))

    def members(self, node: int) -> list[int]:
        return [r for r, n in enumerate(self.node_of) if n == node]

    @property
    def uniform(self) -> bool:
        return len({len(self.members(n)) for n in range(self.nodes)}) == 1

    @property
    def ranks_per_node(self) -> int | None:
        """Ranks on every node, or None when nodes differ."""
        return len(self.members(0)) if self.uniform else None

    def local_index(self, rank: int) -> int:
        return self.members(self.node_of[rank]).index(rank)

    def peers(self, local: int) -> list[int]:
        """The ranks holding local index `local`, one per node, in rank order (an inter-node group)."""
        return [r for r in range(self.world_size) if self.local_index(r) == local]

    def sub(self, ranks: list[int]) -> "NodeLayout":
        """The layout of the group made of `ranks` (ranks of this layout, in group-rank order)."""
        return NodeLayout.from_keys(self.node_of[r] for r in ranks)

    @property
    def hierarchical(self) -> bool:
        """Whether a two-level algorithm differs from a flat one: several nodes, several ranks each."""
        return self.uniform and self.nodes > 1 and self.ranks_per_node > 1

    def key(self) -> str:
        """'2x4' for 2 nodes of 4 ranks; 'uneven' otherwise."""
        return f"{self.nodes}x{self.ranks_per_node}" if self.uniform else "uneven"

    def describe(self) -> str:
        if self.uniform:
            return f"{self.nodes} node{'s' * (self.nodes > 1)} x {self.ranks_per_node} rank" \
                   f"{'s' * (self.ranks_per_node > 1)}"
        return "; ".join(f"node {n} has {_ranges(self.members(n))}" for n in range(self.nodes))


def discover_layout(group=None) -> NodeLayout:
    """Collective over `group`: every rank's node_key(), gathered; the layout of the group."""
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return NodeLayout.single(1 if not dist.is_initialized() else dist.get_world_size(group))
    keys: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(keys, node_key(), group=group)
    return NodeLayout.from_keys(keys)


@dataclass
class LevelGroups:
    """This rank's two levels inside one group: the ranks on its node, and the ranks with its
    local index on the other nodes (process groups; None where this rank is not a member)."""

    layout: NodeLayout
    """Of the group these levels split (group-rank order)."""
    intra: dist.ProcessGroup
    inter: dist.ProcessGroup


def build_level_groups(instances: list[list[int]], world: NodeLayout) -> dict[tuple[int, ...], LevelGroups]:
    """Collective over the default group (every rank calls it with the same `instances`, the
    global ranks of every group of one kind): intra- and inter-node process groups for each
    instance whose layout is hierarchical. Returns those that contain this rank, keyed by the
    instance's sorted ranks. Each call makes new groups, so two communicators never share one."""
    me = dist.get_rank()
    out = {}
    for ranks in instances:
        ranks = sorted(ranks)
        layout = world.sub(ranks)
        if not layout.hierarchical:
            continue
        mine: dict[str, dist.ProcessGroup] = {}
        for n in range(layout.nodes):
            members = [ranks[i] for i in layout.members(n)]
            g = dist.new_group(members)
            if me in members:
                mine["intra"] = g
        for local in range(layout.ranks_per_node):
            members = [ranks[i] for i in layout.peers(local)]
            g = dist.new_group(members)
            if me in members:
                mine["inter"] = g
        if mine:
            out[tuple(ranks)] = LevelGroups(layout, mine["intra"], mine["inter"])
    return out
