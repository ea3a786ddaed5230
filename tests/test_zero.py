"""ZeRO stages 1-3 against a single-process reference, and their per-rank memory."""

import pytest
import torch


@pytest.mark.parametrize("p", [2, 4])
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_matches_single_process(pools, p, stage):
    res = pools(p).run("zero_cases:zero_matches_single_process", stage=stage)
    for r in res:
        torch.testing.assert_close(r["weights"], res[0]["weights"], rtol=0, atol=0)  # replicas agree


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_odd_world_and_other_algorithms(pools, stage):
    pools(3).run("zero_cases:zero_matches_single_process", stage=stage, algorithm="rhd" if stage == 1 else "tree",
                 attention="linear")


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_model_state_bytes_follow_the_formula(pools, stage):
    """fp32 params and grads (4 B each) and Adam's two fp32 moments (K = 8): DDP 16 Psi,
    stage 1 8 Psi + 8 Psi/N, stage 2 4 Psi + 12 Psi/N, stage 3 16 Psi/N; within 5% (padding)."""
    p = 4
    r = pools(p).run("zero_cases:zero_matches_single_process", stage=stage, steps=1, bucket_mb=25.0)[1]
    psi = r["n_params"]
    per = {1: (4 + 4) * psi + 8 * psi / p, 2: 4 * psi + (4 + 8) * psi / p, 3: 16 * psi / p}[stage]
    got = sum(r["bytes"].values())
    assert abs(got - per) / per <= 0.05, (r["bytes"], per)
