"""Checkpoint cases run inside the shared worker pools (see harness.py)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.distributed as dist

from parallel.atomic import atomic_write
from trainer import checkpoint


def slow_rank_save(rank: int, world: int, root: str, slow_rank: int, delay_s: float) -> dict:
    """Every rank saves step 1; `slow_rank` writes its files `delay_s` late. When save returns,
    the sealed checkpoint must hold every rank's files, whatever order the ranks finished in."""
    ckpt_root = Path(root)

    def save_optimizer(folder: Path) -> None:
        if rank == slow_rank:
            time.sleep(delay_s)
        atomic_write(folder / f"opt_{rank}.bin", lambda fh: fh.write(bytes([rank]) * 64))

    try:
        final = checkpoint.save(ckpt_root, 1, model_state={"w": torch.arange(4.0)} if rank == 0 else None,
                                save_optimizer=save_optimizer, rank_state={"sampler": {"position": rank}},
                                rank=rank, world_size=world)
    except Exception:
        dist.barrier()  # meet the peers' last barrier, so a failing rank fails the test at once, not at a timeout
        raise
    meta = json.loads((final / "meta.json").read_text())
    return {"problem": checkpoint.verify(final), "files": sorted(meta["files"]),
            "leftovers": sorted(p.name for p in ckpt_root.iterdir() if p.name.startswith("."))}
