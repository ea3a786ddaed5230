"""Checkpoints: `<run_dir>/checkpoints/step_<N>/`, written atomically by all ranks.

Layout of one checkpoint:
    model.pt        rank 0: the model's full state_dict (ZeRO: gathered from the shards)
    optimizer.pt    DDP: rank 0's optimizer state_dict (replicated on every rank)
    optimizer/      ZeRO: the sharded optimizer state, torch.distributed.checkpoint format,
                    readable by any world size (resharding happens on load)
    rank_<r>.pt     every rank: its data sampler position and RNG states
    meta.json       written last: step, world size, and the size and CRC-32 of every other
                    file; its presence marks a complete checkpoint, its list a correct one

Protocol: every rank writes into `checkpoints/.tmp_step_<N>/` (each file itself via
temp file + fsync + rename), a barrier, then rank 0 writes meta.json and renames the
directory to `step_<N>` in one step, and a second barrier. A crash at any point
leaves either no `step_<N>` or a complete one; `latest` ignores anything without
meta.json, so a half-written checkpoint is never loaded; `latest` also re-checks every
file's size and CRC-32 against meta.json and skips (with a warning) a checkpoint whose
files were truncated or damaged afterwards, falling back to the previous one.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from parallel.atomic import atomic_write, fsync_dir

from .structured import ConfigError

_STEP_DIR = re.compile(r"^step_(\d+)$")
FORMAT_VERSION = 2
log = logging.getLogger("ringtrain.checkpoint")


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            crc = zlib.crc32(chunk, crc)
    return crc


def _inventory(folder: Path) -> dict[str, list[int]]:
    """{relative path: [size, crc32]} of every file below `folder` except meta.json."""
    return {str(f.relative_to(folder)): [f.stat().st_size, _crc32(f)]
            for f in sorted(folder.rglob("*")) if f.is_file() and f.name != "meta.json"}


def verify(path: Path) -> str | None:
    """None if `path` is a complete checkpoint whose files match meta.json, else what is wrong."""
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, ValueError) as e:
        return f"meta.json unreadable ({e})"
    files = meta.get("files")
    if not isinstance(files, dict):  # format 1 listed names only: check they exist
        missing = [n for n in (files or []) if not (path / n).exists()]
        return f"missing {missing}" if missing else None
    for name, (size, crc) in files.items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != size:
            return f"{name} is {f.stat().st_size} bytes, meta.json says {size} (truncated?)"
        if _crc32(f) != crc:
            return f"{name} fails its CRC-32 check (damaged)"
    return None


def _atomic_save(obj, path: Path) -> None:
    atomic_write(path, lambda fh: torch.save(obj, fh))


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def complete_checkpoints(ckpt_root: Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint, oldest first."""
    if not ckpt_root.is_dir():
        return []
    found = []
    for p in ckpt_root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and (p / "meta.json").is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest(ckpt_root: Path) -> Path | None:
    """The newest complete checkpoint whose files pass `verify`; damaged ones are reported and skipped."""
    for _, path in reversed(complete_checkpoints(ckpt_root)):
        problem = verify(path)
        if problem is None:
            return path
        log.warning(f"skipping checkpoint {path}: {problem}")
    return None


def save(ckpt_root: Path, step: int, *, model_state: dict | None, save_optimizer,
         rank_state: dict, rank: int, world_size: int, group=None, keep: int = 0,
         extra_meta: dict | None = None) -> Path:
    """Collective: every rank calls it with the same step. Returns the final directory."""
    final = ckpt_root / f"step_{step}"
    tmp = ckpt_root / f".tmp_step_{step}"
    if rank == 0:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # debris of a crashed save
        tmp.mkdir()
    _barrier(group)
    if rank == 0:
        _atomic_save(model_state, tmp / "model.pt")
    save_optimizer(tmp)  # collective under ZeRO (sharded, DCP); rank 0's file under DDP
    _atomic_save({"rng": rng_state(), **rank_state}, tmp / f"rank_{rank}.pt")
    _barrier(group)
    if rank == 0:
        meta = {"format": FORMAT_VERSION, "step": step, "world_size": world_size,
                "files": _inventory(tmp), **(extra_meta or {})}
        atomic_write(tmp / "meta.json", lambda fh: fh.write(json.dumps(meta, indent=1).encode()))
        fsync_dir(tmp)
        if final.exists():  # re-saving a step (e.g. after resuming at it): replace whole
            old = ckpt_root / f".old_step_{step}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        fsync_dir(ckpt_root)
        if keep > 0:
            for _, old_path in complete_checkpoints(ckpt_root)[:-keep]:
                shutil.rmtree(old_path, ignore_errors=True)
    _barrier(group)
    return final


def load(path: Path, *, model: torch.nn.Module, rank: int, world_size: int, device: torch.device,
         parallel: str | None = None, ep_size: int = 1, verify_files: bool = True) -> tuple[int, dict, bool]:
    """Loads the model and this rank's state from a complete checkpoint; returns (step,
    rank state, resharded). With another world size every rank takes rank 0's state
    (sampler positions differ only by rank; the caller converts them). Raises ConfigError
    naming trainer.resume for an incomplete checkpoint, another model or another layout."""
    meta_path = path / "meta.json"
    if not meta_path.is_file():
        raise ConfigError(f"trainer.resume={str(path)!r}: not a complete checkpoint (no meta.json)")
    problem = verify(path) if verify_files else None  # False: `latest` has just checked it
    if problem is not None:
        raise ConfigError(f"trainer.resume={str(path)!r}: damaged checkpoint: {problem}")
    meta = json.loads(meta_path.read_text())
    resharded = meta["world_size"] != world_size
    rank_file = path / f"rank_{0 if resharded else rank}.pt"
    if not rank_file.is_file():
        raise ConfigError(f"trainer.resume={str(path)!r}: {rank_file.name} is missing")
    if parallel is not None and meta.get("parallel", parallel) != parallel:
        raise ConfigError(f"trainer.resume={str(path)!r}: saved with parallel={meta['parallel']}, this run "
                         f"uses parallel={parallel}; their optimizer states are laid out differently")
    if meta.get("ep_size", 1) != ep_size:
        raise ConfigError(f"trainer.resume={str(path)!r}: saved with parallel.ep_size={meta.get('ep_size', 1)}, "
                         f"this run uses parallel.ep_size={ep_size}; each expert slice has its own optimizer file")
    try:
        model.load_state_dict(torch.load(path / "model.pt", map_location=device, weights_only=True))
    except RuntimeError as e:  # missing / unexpected keys or shapes: another model
        raise ConfigError(f"trainer.resume={str(path)!r}: the checkpoint holds another model: {e}") from None
    state = torch.load(rank_file, map_location="cpu", weights_only=False)
    set_rng_state(state.pop("rng"))
    return int(meta["step"]), state, resharded


def _barrier(group) -> None:
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.barrier(group)
