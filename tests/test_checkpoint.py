"""The checkpointer: rank 0 seals (meta.json, rename) only after every rank wrote; rank and sharded
state are tensors and plain types, and a checkpoint that would run code when loaded is refused."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from trainer import checkpoint
from trainer.checkpoint import CheckpointManager, EngineState
from trainer.structured import ConfigError


@pytest.mark.parametrize("slow_rank", [0, 1])
def test_the_checkpoint_is_sealed_only_after_every_rank_wrote(pools, tmp_path, slow_rank):
    res = pools(2).run("checkpoint_cases:slow_rank_save", root=str(tmp_path / "checkpoints"),
                       slow_rank=slow_rank, delay_s=0.5)
    for r in res:
        assert r["problem"] is None, r
        assert r["files"] == ["model.pt", "rank_0.pt", "rank_1.pt"] and r["sharded"], r
        assert r["leftovers"] == [], r  # no .tmp_step_1 left behind


class _Trap:
    """Unpickling one runs code (touches a marker file): what weights_only loading must refuse."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def _reseal(step_dir: Path) -> None:
    """Rewrites meta.json's sizes and checksums, as someone handing over a doctored checkpoint would."""
    meta = checkpoint.read_meta(step_dir)
    meta["files"] = checkpoint._inventory(step_dir)
    (step_dir / "meta.json").write_text(json.dumps(meta))


def _one_rank_checkpoint(root: Path) -> tuple[CheckpointManager, Path]:
    manager = CheckpointManager(root, rank=0, world_size=1, layout={"engine": "test"})
    state = EngineState(model={"weight": torch.ones(1, 1), "bias": torch.zeros(1)},
                        sharded={"weight.exp_avg": torch.ones(3)}, local={"skipped": 0})
    return manager, manager.save(4, state, {"sampler": {"position": 2}})


def test_rank_state_round_trips_as_tensors_and_plain_types(tmp_path):
    manager, path = _one_rank_checkpoint(tmp_path)
    restored = manager.load(path, model=torch.nn.Linear(1, 1), device=torch.device("cpu"))
    assert (restored.step, restored.rank_state["sampler"], restored.rank_state["engine"]) == (4, {"position": 2},
                                                                                               {"skipped": 0})
    template = {"weight.exp_avg": torch.zeros(3)}
    manager.load_sharded(path, template)
    assert torch.equal(template["weight.exp_avg"], torch.ones(3))


@pytest.mark.parametrize("victim", ["rank_0.pt", "model.pt"])
def test_a_checkpoint_that_would_run_code_is_refused(tmp_path, victim):
    manager, path = _one_rank_checkpoint(tmp_path / "checkpoints")
    marker = tmp_path / "code-ran"
    payload = torch.load(path / victim, weights_only=True)
    payload["trap" if victim == "rank_0.pt" else "weight"] = _Trap(marker)
    torch.save(payload, path / victim)
    _reseal(path)
    assert checkpoint.verify(path) is None  # sizes and CRCs cannot tell: the content is refused
    with pytest.raises(ConfigError, match="refused, it holds objects other than tensors"):
        manager.load(path, model=torch.nn.Linear(1, 1), device=torch.device("cpu"))
    assert not marker.exists()


def test_sharded_state_that_would_run_code_is_refused(tmp_path):
    import torch.distributed.checkpoint as dcp

    manager, path = _one_rank_checkpoint(tmp_path / "checkpoints")
    marker = tmp_path / "code-ran"
    shutil.rmtree(path / "optimizer")
    dcp.save({"weight.exp_avg": _Trap(marker)}, checkpoint_id=str(path / "optimizer"), no_dist=True)
    _reseal(path)
    with pytest.raises(ConfigError, match="holds tensors only"):
        manager.load_sharded(path, {"weight.exp_avg": torch.zeros(3)})
    assert not marker.exists()
