"""The mesh: expert-parallel groups of consecutive ranks, expert-data-parallel groups across them."""

import pytest

from parallel.mesh import MeshShape


def test_ep_groups_on_four_ranks(pools):
    res = pools(4).run("dist_cases:topology_groups", ep_size=2)
    for rank, r in enumerate(res):
        assert r["dp"] == [0, 1, 2, 3] and r["dp_sum"] == 6
        assert r["sizes"] == {"dp": 4, "ep": 2, "expert_dp": 2}
        assert r["ep"] == ([0, 1] if rank < 2 else [2, 3])
        assert r["expert_dp"] == ([0, 2] if rank % 2 == 0 else [1, 3])
        assert r["ep_sum"] == sum(r["ep"]) and r["expert_dp_sum"] == sum(r["expert_dp"])
        assert r["ep_rank"] == rank % 2
        assert r["communicators"] == ["dp", "ep", "expert_dp"]
        assert r["distinct_groups"]


def test_ep_over_the_whole_world_gets_a_group_of_its_own(pools):
    # every communicator owns its process group: the expert all-to-all (main thread) and the dense
    # buckets' all-reduce (the communicator's thread) must never post on the same gloo group
    for r in pools(2).run("dist_cases:topology_groups", ep_size=2):
        assert r["dp"] == r["ep"] == [0, 1] and r["expert_dp"] == [r["ep_rank"]]
        assert r["distinct_groups"] and r["communicators"] == ["dp", "ep", "expert_dp"]


def test_ep_size_one_keeps_experts_dense(pools):
    # each rank is its own ep group; every rank holds the same (all) experts, so expert_dp is the
    # world, and a parallelized model gets only the dense communicator
    for rank, r in enumerate(pools(3).run("dist_cases:topology_groups", ep_size=1)):
        assert r["dp"] == r["expert_dp"] == [0, 1, 2] and r["ep"] == [rank]
        assert r["communicators"] == ["dp"]


def test_cp_groups_are_consecutive_ranks_and_share_the_data(pools):
    # dp 2 x cp 2: ranks 0, 1 split one replica's sequences, 2, 3 the other's; gradients still
    # average over all four (parameters are replicated over cp)
    for rank, r in enumerate(pools(4).run("dist_cases:topology_groups", ep_size=1, cp_size=2)):
        assert r["cp"] == ([0, 1] if rank < 2 else [2, 3]) and r["cp_sum"] == sum(r["cp"])
        assert r["dp"] == [0, 1, 2, 3] and r["sizes"]["cp"] == 2
        assert r["data"] == (rank // 2, 2)
        assert r["instances"]["cp"] == [[0, 1], [2, 3]]
        assert r["communicators"] == ["cp", "dp"] and r["distinct_groups"]
    for r in pools(2).run("dist_cases:topology_groups", ep_size=1, cp_size=2):  # cp over the whole world
        assert r["cp"] == r["dp"] == [0, 1] and r["data"] == (0, 1) and r["distinct_groups"]


@pytest.mark.parametrize("world, cp, ep, key", [(4, 3, 1, "parallel.cp_size"), (4, 0, 1, "parallel.cp_size"),
                                                (4, 2, 2, "parallel.ep_size=2 with parallel.cp_size=2")])
def test_bad_cp_size_names_the_key(world, cp, ep, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        MeshShape(world, ep=ep, cp=cp).validate()


@pytest.mark.parametrize("world, ep", [(4, 3), (4, 0), (2, -1)])
def test_bad_ep_size_names_the_key(world, ep):
    with pytest.raises(ValueError, match="parallel.ep_size"):
        MeshShape(world, ep=ep).validate()
