"""The job's layout as one validated object that hands out named process groups.

Ranks form a 2-D mesh (dp_outer, ep) laid out row-major: expert-parallel groups are
`ep_size` consecutive ranks (on one node when ep_size divides the GPUs per node, so
all-to-all stays on the fast links), and dense parameters are replicated over the
whole world. Expert parameters are replicated only across the ranks that hold the
same experts: the `expert_dp` groups, one per position in an ep group.

Every rank must build the same Topology in the same order (torch.distributed
creates groups collectively), which is why it is built once, early, from plain ints.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.distributed as dist


@dataclass
class Topology:
    """Named process groups of one job; build with `Topology.build`."""

    rank: int
    world_size: int
    ep_size: int
    world: dist.ProcessGroup | None = field(repr=False)
    ep: dist.ProcessGroup | None = field(repr=False)
    expert_dp: dist.ProcessGroup | None = field(repr=False)

    @property
    def dp(self) -> dist.ProcessGroup | None:
        """Group over which dense parameters are replicated and gradients averaged."""
        return self.world

    @property
    def dp_rank(self) -> int:
        return self.rank

    @property
    def dp_size(self) -> int:
        return self.world_size

    @property
    def ep_rank(self) -> int:
        return self.rank % self.ep_size

    @staticmethod
    def validate(world_size: int, ep_size: int) -> None:
        """Raises ValueError naming `parallel.ep_size` when the mesh cannot be built."""
        if ep_size < 1:
            raise ValueError(f"parallel.ep_size must be >= 1, got {ep_size}")
        if world_size % ep_size:
            raise ValueError(f"parallel.ep_size={ep_size} must divide the world size {world_size}")

    @classmethod
    def build(cls, *, ep_size: int = 1) -> "Topology":
        """Collective: every rank calls it with the same ep_size after init_process_group."""
        rank, world = dist.get_rank(), dist.get_world_size()
        cls.validate(world, ep_size)
        world_group = dist.group.WORLD
        ep_group, expert_dp_group = world_group, world_group
        if ep_size > 1:
            for start in range(0, world, ep_size):
                ranks = list(range(start, start + ep_size))
                g = dist.new_group(ranks)
                if rank in ranks:
                    ep_group = g
            for pos in range(ep_size):
                ranks = list(range(pos, world, ep_size))
                g = dist.new_group(ranks)
                if rank in ranks:
                    expert_dp_group = g
        return cls(rank, world, ep_size, world_group, ep_group, expert_dp_group)
