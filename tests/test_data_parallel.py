"""Data parallelism against a single-process reference, on gloo, world sizes 1-4."""

import pytest
import torch

from parallel.flat_params import plan_buckets


@pytest.mark.parametrize("p", [1, 2, 3, 4])
@pytest.mark.parametrize("algorithm", ["ring", "rhd", "tree", "native"])
def test_gradients_and_weights_match_single_process(pools, p, algorithm):
    res = pools(p).run("ddp_cases:ddp_matches_reference", algorithm=algorithm, bucket_mb=0.01,
                       first_bucket_mb=0.002, accum=3)
    assert res[0]["buckets"] >= 3  # the case really exercises several buckets
    for r in res:
        assert r["calls_in_no_sync"] == 0, "accumulation micro-steps must not communicate"
        torch.testing.assert_close(r["weights"], res[0]["weights"], rtol=0, atol=0)  # replicas identical


def test_one_big_bucket_and_no_accumulation(pools):
    res = pools(3).run("ddp_cases:ddp_matches_reference", algorithm="ring", bucket_mb=25.0,
                       first_bucket_mb=25.0, accum=1)
    assert res[0]["buckets"] == 2  # one float32 bucket, one float64 bucket


def test_unused_parameter_is_a_clear_error(pools):
    res = pools(2).run("ddp_cases:ddp_unused", find_unused=False)
    for r in res:
        assert r["error"] is not None
        assert "unused.weight" in r["error"] and "parallel.find_unused_parameters" in r["error"]


def test_unused_parameter_flag_matches_single_process(pools):
    """find_unused_parameters=True, 2 steps of 2 micro-steps: every gradient (the unused one
    zero) and the weights equal a single-process reference (compared in the case, rtol 1e-6)."""
    res = pools(2).run("ddp_cases:ddp_unused", find_unused=True)
    for r in res:
        assert r["error"] is None and r["unused_grad_abs"] == 0.0, r


def test_first_buckets_launch_before_backward_reaches_the_first_layer(pools):
    events = pools(2).run("ddp_cases:ddp_overlap")[0]
    assert "l1_backward" in events and events.count("launch") >= 3
    assert events.index("launch") < events.index("l1_backward"), events


def test_bucket_plan_caps_order_and_dtypes():
    params = [torch.nn.Parameter(torch.zeros(n, dtype=dt)) for n, dt in
              [(100, torch.float32), (300, torch.float32), (50, torch.float64), (1000, torch.float32),
               (10, torch.float32)]]
    groups = plan_buckets(params, bucket_bytes=1600, first_bucket_bytes=400)
    # first bucket capped at 400 B: only the 100-element parameter; a parameter larger than
    # the cap gets its own bucket; float64 never shares a bucket with float32
    assert [[p.numel() for p in g] for g in groups] == [[100], [300], [50], [1000], [10]]
    assert all(len({p.dtype for p in g}) == 1 for g in groups)
    flat = [p for g in groups for p in g]
    assert sorted(map(id, flat)) == sorted(map(id, params))
