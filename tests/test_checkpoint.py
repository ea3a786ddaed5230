"""The checkpoint protocol with real ranks: rank 0 seals (meta.json, rename) only after every rank wrote."""

import pytest


@pytest.mark.parametrize("slow_rank", [0, 1])
def test_the_checkpoint_is_sealed_only_after_every_rank_wrote(pools, tmp_path, slow_rank):
    res = pools(2).run("checkpoint_cases:slow_rank_save", root=str(tmp_path / "checkpoints"),
                       slow_rank=slow_rank, delay_s=0.5)
    for r in res:
        assert r["problem"] is None, r
        assert r["files"] == ["model.pt", "opt_0.bin", "opt_1.bin", "rank_0.pt", "rank_1.pt"], r
        assert r["leftovers"] == [], r  # no .tmp_step_1 left behind
