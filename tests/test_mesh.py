"""The mesh: expert-parallel groups of consecutive ranks, expert-data-parallel groups across them."""

import pytest

from parallel.topology import Topology


def test_ep_groups_on_four_ranks(pools):
    res = pools(4).run("dist_cases:topology_groups", ep_size=2)
    for rank, r in enumerate(res):
        assert r["world"] == [0, 1, 2, 3] and r["world_sum"] == 6 and r["dp_size"] == 4
        assert r["ep"] == ([0, 1] if rank < 2 else [2, 3])
        assert r["expert_dp"] == ([0, 2] if rank % 2 == 0 else [1, 3])
        assert r["ep_sum"] == sum(r["ep"]) and r["expert_dp_sum"] == sum(r["expert_dp"])
        assert r["ep_rank"] == rank % 2


def test_ep_size_one_is_the_world(pools):
    for r in pools(3).run("dist_cases:topology_groups", ep_size=1):
        assert r["world"] == r["ep"] == r["expert_dp"] == [0, 1, 2]


@pytest.mark.parametrize("world, ep", [(4, 3), (4, 0), (2, -1)])
def test_bad_ep_size_names_the_key(world, ep):
    with pytest.raises(ValueError, match="parallel.ep_size"):
        Topology.validate(world, ep)
