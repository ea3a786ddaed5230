"""The job's layout: one device mesh with named dimensions, and the process groups it hands out.

Ranks form a mesh laid out row-major over the dimensions ("dp_outer", "ep", "cp"), the last
varying fastest: a context-parallel group is `cp` consecutive ranks and an expert-parallel
group `ep` consecutive ranks (each on one node when it divides the ranks per node, so the
ring attention's blocks and the all-to-all stay on the fast links). Callers ask for groups
by name (`Topology.group`), so a new dimension reshapes none of them.

Named groups:

    dp          every rank: dense parameters are replicated over it and their gradients averaged
                (data parallelism proper times cp: parameters are replicated over cp too)
    cp          the ranks that split each sequence between them (only with cp > 1)
    ep          the ranks that share one set of experts between them (each holds a slice)
    expert_dp   the ranks that hold the same expert slice (one per position in an ep group)

The data: the ranks of one cp group read the same sequences, so the sampler's rank and size
are `data_rank` and `data_size` (world / cp), not the global ones.

Nodes: the Topology also knows which ranks share a node (`layout`, found by exchanging
node identities once, see collectives/nodes.py). Communicators for `hier` and `auto` get,
for every group that spans several nodes with equal ranks on each, its intra-node and
inter-node process groups, so the same names (dp, ep, expert_dp) run on two levels.

Every rank must build the same Topology (torch.distributed creates groups collectively),
which is why it is built once, early, from plain ints (`MeshShape`), checked before any
process group exists.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from .collectives import AUTO, Communicator, NodeLayout, Tuning, TuningTable, discover_layout
from .collectives.nodes import build_level_groups


@dataclass(frozen=True)
class MeshShape:
    """The mesh's size per dimension; `validate` needs no process group."""

    world_size: int
    ep: int = 1
    cp: int = 1

    def validate(self) -> None:
        """Raises ValueError naming `parallel.ep_size` / `parallel.cp_size` when the mesh cannot be built."""
        for key, n in (("ep_size", self.ep), ("cp_size", self.cp)):
            if n < 1:
                raise ValueError(f"parallel.{key} must be >= 1, got {n}")
            if self.world_size % n:
                raise ValueError(f"parallel.{key}={n} must divide the world size {self.world_size}")
        if self.ep > 1 and self.cp > 1:
            raise ValueError(f"parallel.ep_size={self.ep} with parallel.cp_size={self.cp}: expert and context "
                             "parallelism do not compose yet")

    @property
    def dims(self) -> dict[str, int]:
        return {"dp_outer": self.world_size // (self.ep * self.cp), "ep": self.ep, "cp": self.cp}


class Topology:
    """Named process groups of one job over one DeviceMesh; build with `Topology.build`."""

    def __init__(self, mesh: DeviceMesh, shape: MeshShape, groups: dict[str, dist.ProcessGroup],
                 layout: NodeLayout):
        self.mesh, self.shape, self._groups = mesh, shape, groups
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.layout = layout
        """Which node every global rank is on."""

    @classmethod
    def build(cls, shape: MeshShape, device_type: str = "cpu", *, layout: NodeLayout | None = None) -> "Topology":
        """Collective: every rank calls it with the same shape after init_process_group. The node
        layout is discovered (one exchange) unless given."""
        shape.validate()
        if shape.world_size != dist.get_world_size():
            raise ValueError(f"the mesh is for {shape.world_size} ranks but the job has {dist.get_world_size()}")
        dims = shape.dims
        mesh = init_device_mesh(device_type, tuple(dims.values()), mesh_dim_names=tuple(dims))
        groups = {"dp": dist.group.WORLD}
        named = [("ep", "ep"), ("expert_dp", "dp_outer")] + ([("cp", "cp")] if shape.cp > 1 else [])
        for name, dim in named:
            g = mesh.get_group(dim)
            if g is dist.group.WORLD:
                # DeviceMesh hands back the default group for a dimension spanning every rank, but
                # each communicator needs a group of its own: two threads posting point-to-point
                # messages on one gloo group (the expert all-to-all beside a bucket all-reduce)
                # can have a message matched to the other's receive
                g = dist.new_group(list(range(shape.world_size)))
            groups[name] = g
        if layout is None:
            layout = discover_layout()
        elif layout.world_size != shape.world_size:
            raise ValueError(f"the node layout is for {layout.world_size} ranks, the job has {shape.world_size}")
        return cls(mesh, shape, groups, layout)

    def group(self, name: str) -> dist.ProcessGroup:
        """The process group called `name` (see the module docstring) that this rank belongs to;
        each name has a process group of its own, even where two span the same ranks."""
        if name not in self._groups:
            raise ValueError(f"no group named {name!r}; groups: {', '.join(self._groups)}")
        return self._groups[name]

    def size(self, name: str) -> int:
        return dist.get_world_size(self.group(name))

    def rank_in(self, name: str) -> int:
        return dist.get_rank(self.group(name))

    @property
    def data_rank(self) -> int:
        """This rank's place among the data-parallel replicas: the ranks of one cp group share it."""
        return self.rank // self.shape.cp

    @property
    def data_size(self) -> int:
        """Data-parallel replicas that read different sequences: world / cp."""
        return self.world_size // self.shape.cp

    def instances(self, name: str) -> list[list[int]]:
        """The global ranks of every group called `name` (this rank's and the others')."""
        d = self.shape.dims
        grid = self.mesh.mesh.reshape(d["dp_outer"], d["ep"], d["cp"])  # (dp_outer, ep, cp)
        if name == "dp":
            return [list(range(self.world_size))]
        if name == "cp" and name in self._groups:
            return [grid[i, j].tolist() for i in range(d["dp_outer"]) for j in range(d["ep"])]
        if name == "ep":
            return [grid[i, :, k].tolist() for i in range(d["dp_outer"]) for k in range(d["cp"])]
        if name == "expert_dp":
            return [grid[:, j, k].tolist() for j in range(d["ep"]) for k in range(d["cp"])]
        raise ValueError(f"no group named {name!r}; groups: {', '.join(self._groups)}")

    def layout_of(self, name: str) -> NodeLayout:
        """The node layout of this rank's group `name`, in its group-rank order."""
        return self.layout.sub(dist.get_process_group_ranks(self.group(name)))

    def communicators(self, *, algorithm: str, tuning: Tuning | None = None,
                      timeout_s: float | None = None, table: TuningTable | None = None) -> "Comms":
        """One Communicator per group a parallelized model talks through (expert groups only with ep > 1).

        Collective. `hier` and `auto` get each group's two levels where it has them; `hier` on a
        world whose nodes hold different numbers of ranks is refused (ValueError naming the
        layout). `table` serves `auto` on the groups whose layout it was measured for."""
        if algorithm == "hier" and not self.layout.uniform:
            raise ValueError(f"parallel.algorithm=hier needs the same number of ranks on every node; "
                             f"this job: {self.layout.describe()} (use a flat algorithm or auto)")
        names = ["dp"] + (["cp"] if self.shape.cp > 1 else []) + (["ep", "expert_dp"] if self.shape.ep > 1 else [])
        backend = str(dist.get_backend())

        def make(name):
            layout = self.layout_of(name)
            levels = None
            if algorithm in ("hier", AUTO):  # collective: every rank helps create every group's levels
                mine = build_level_groups(self.instances(name), self.layout)
                levels = mine.get(tuple(sorted(dist.get_process_group_ranks(self.group(name)))))
            usable = table if table is not None and table.mismatch(
                world_size=layout.world_size, layout=layout, backend=backend) is None else None
            return Communicator(self.group(name), algorithm=algorithm, tuning=tuning, timeout_s=timeout_s,
                                layout=layout if layout.uniform else None, levels=levels, table=usable)
        comms = {name: make(name) for name in names}
        return Comms(**comms)


@dataclass
class Comms:
    """The communicators of a parallelized model. `ep` and `expert_dp` exist only with expert
    parallelism (ep > 1); otherwise expert weights are dense weights like any other."""

    dp: Communicator
    """Dense gradients and parameters: every rank."""
    cp: Communicator | None = None
    """Context parallelism's traffic: ring attention's K/V blocks, the linear kinds' states (cp > 1)."""
    ep: Communicator | None = None
    """Expert parallelism's token all-to-all, and gathering the expert slices for a full state_dict."""
    expert_dp: Communicator | None = None
    """The replicas of this rank's expert slice: expert gradients are reduced and sharded over it."""

    @property
    def experts_apart(self) -> bool:
        return self.expert_dp is not None

    def all(self) -> list[Communicator]:
        return [c for c in (self.dp, self.cp, self.ep, self.expert_dp) if c is not None]

    def close(self) -> None:
        for c in self.all():
            c.close()
