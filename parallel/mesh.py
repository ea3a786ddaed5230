"""The job's layout: one device mesh with named dimensions, and the process groups it hands out.

Ranks form a mesh laid out row-major over the dimensions ("dp_outer", "ep"), the last
varying fastest: an expert-parallel group is `ep` consecutive ranks (on one node when ep
divides the ranks per node, so all-to-all stays on the fast links). Context parallelism
will add a "cp" dimension after "ep" and nodes a dimension of their own; callers ask for
groups by name (`Topology.group`), so neither reshapes them.

Named groups:

    dp          every rank: dense parameters are replicated over it and their gradients averaged
    ep          the ranks that share one set of experts between them (each holds a slice)
    expert_dp   the ranks that hold the same expert slice (one per position in an ep group)

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

    def validate(self) -> None:
        """Raises ValueError naming `parallel.ep_size` when the mesh cannot be built."""
        if self.ep < 1:
            raise ValueError(f"parallel.ep_size must be >= 1, got {self.ep}")
        if self.world_size % self.ep:
            raise ValueError(f"parallel.ep_size={self.ep} must divide the world size {self.world_size}")

    @property
    def dims(self) -> dict[str, int]:
        return {"dp_outer": self.world_size // self.ep, "ep": self.ep}


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
        for name, dim in (("ep", "ep"), ("expert_dp", "dp_outer")):
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

    def instances(self, name: str) -> list[list[int]]:
        """The global ranks of every group called `name` (this rank's and the others')."""
        grid = self.mesh.mesh.reshape(self.shape.dims["dp_outer"], self.shape.ep)
        if name == "dp":
            return [list(range(self.world_size))]
        if name == "ep":
            return [row.tolist() for row in grid]
        if name == "expert_dp":
            return [col.tolist() for col in grid.t()]
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
        names = ["dp"] if self.shape.ep == 1 else ["dp", "ep", "expert_dp"]
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
    ep: Communicator | None = None
    """Expert parallelism's token all-to-all, and gathering the expert slices for a full state_dict."""
    expert_dp: Communicator | None = None
    """The replicas of this rank's expert slice: expert gradients are reduced and sharded over it."""

    @property
    def experts_apart(self) -> bool:
        return self.expert_dp is not None

    def all(self) -> list[Communicator]:
        return [c for c in (self.dp, self.ep, self.expert_dp) if c is not None]

    def close(self) -> None:
        for c in self.all():
            c.close()
