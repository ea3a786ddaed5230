"""Checkpoint cases run inside the shared worker pools (see harness.py)."""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.distributed as dist

from trainer import checkpoint
from trainer.checkpoint import CheckpointManager, EngineState


class _SlowManager(CheckpointManager):
    """The real checkpointer, except that one rank writes its own files `delay_s` late."""

    def __init__(self, *args, slow: bool, delay_s: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.slow, self.delay_s = slow, delay_s

    def _save_sharded(self, sharded, folder):
        super()._save_sharded(sharded, folder)
        if self.slow:
            time.sleep(self.delay_s)  # rank_<r>.pt is written right after this


def slow_rank_save(rank: int, world: int, root: str, slow_rank: int, delay_s: float) -> dict:
    """Every rank saves step 1; `slow_rank` writes its rank file `delay_s` late. When save returns,
    the sealed checkpoint must hold every rank's files, whatever order the ranks finished in."""
    ckpt_root = Path(root)
    manager = _SlowManager(ckpt_root, rank=rank, world_size=world, layout={"engine": "test"},
                           slow=rank == slow_rank, delay_s=delay_s)
    state = EngineState(model={"w": torch.arange(4.0)} if rank == 0 else None,
                        sharded={"moment": torch.full((3,), 1.0)}, local={"position": rank})
    try:
        final = manager.save(1, state, {"sampler": {"position": rank}})
    except Exception:
        dist.barrier()  # meet the peers' last barrier, so a failing rank fails the test at once, not at a timeout
        raise
    meta = checkpoint.read_meta(final)
    files = sorted(f for f in meta["files"] if not f.startswith("optimizer/"))
    return {"problem": checkpoint.verify(final), "files": files,
            "sharded": any(f.startswith("optimizer/") for f in meta["files"]),
            "leftovers": sorted(p.name for p in ckpt_root.iterdir() if p.name.startswith("."))}
