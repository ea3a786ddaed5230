"""The one checkpointer: every checkpoint file is written and read here, and nowhere else.

Layout of `<run_dir>/checkpoints/step_<N>/` (format 3):

    model.pt       rank 0: the model's full state_dict (ZeRO: gathered from the shards; float32
                   masters in mixed precision); tensors only
    optimizer/     the engine's sharded state through torch.distributed.checkpoint (DCP): the
                   optimizer's state tensors, replicated ones once, ZeRO's as DTensors over
                   unit vectors, so any world size can read them back; tensors only
    rank_<r>.pt    every rank: RNG states, the data sampler's position and the engine's own
                   per-rank state, as tensors and plain Python types
    meta.json      written last: format, step, world size, the layout (engine, parallelism,
                   ep_size), and the size and CRC-32 of every other file

Engines and wrappers only hand state dicts over (`EngineState`); nothing else opens these
files. Every load is `torch.load(..., weights_only=True)` and DCP reads through a planner
that refuses non-tensor items, so a checkpoint from someone else cannot run code.

Protocol: every rank writes into `checkpoints/.tmp_step_<N>/` (each file via temp file +
fsync + rename), a barrier, then rank 0 writes meta.json and renames the directory to
`step_<N>` in one step, and a second barrier. A crash at any point leaves either no
`step_<N>` or a complete one; `latest` ignores anything without meta.json and re-checks
every file's size and CRC-32, skipping (with a warning) a checkpoint damaged afterwards.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import random
import re
import shutil
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

from parallel.atomic import atomic_write, fsync_dir

from .structured import ConfigError

_STEP_DIR = re.compile(r"^step_(\d+)$")
FORMAT_VERSION = 3
log = logging.getLogger("ringtrain.checkpoint")


@dataclass
class EngineState:
    """What an engine hands the checkpointer, and gets back on resume."""

    model: dict | None = None
    """Rank 0: the full model state_dict (float32 masters); None on other ranks."""
    sharded: dict = field(default_factory=dict)
    """Tensors (or DTensors) saved and loaded collectively through DCP; loaded in place."""
    local: dict = field(default_factory=dict)
    """This rank's own state, tensors and plain types only (saved in rank_<r>.pt)."""


@dataclass
class Restored:
    """What `CheckpointManager.load` read before the engine exists."""

    path: Path
    step: int
    rank_state: dict
    resharded: bool
    """Saved with another world size: per-rank state came from rank 0 (the sampler converts it)."""


# -- files ------------------------------------------------------------------------------
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


def read_meta(path: Path) -> dict:
    return json.loads((Path(path) / "meta.json").read_text())


def verify(path: Path) -> str | None:
    """None if `path` is a complete checkpoint whose files match meta.json, else what is wrong."""
    try:
        meta = read_meta(path)
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


def read_model_state(path: Path, device: torch.device | str = "cpu") -> dict:
    """The consolidated model state_dict of a checkpoint (tensors only)."""
    return torch.load(Path(path) / "model.pt", map_location=device, weights_only=True)


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


def resolve_resume(resume: str, ckpt_root: Path) -> Path | None:
    """trainer.resume -> the checkpoint to load: none, auto (the latest complete one, if any) or a path."""
    if resume == "none":
        return None
    if resume == "auto":
        return latest(ckpt_root)
    path = Path(resume)
    if not (path / "meta.json").is_file():
        raise ConfigError(f"trainer.resume={resume!r} is not a complete checkpoint directory")
    return path


# -- RNG states as tensors and plain types ------------------------------------------------
def rng_state() -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss,
                                                      gauss],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(tuple(state["python"][:1]) + (tuple(state["python"][1]),) + tuple(state["python"][2:]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class _TensorsOnlyLoadPlanner(DefaultLoadPlanner):
    """DCP's default planner, except that a non-tensor item (which DCP would unpickle) is refused."""

    def load_bytes(self, read_item, value):
        raise ValueError(f"{read_item.dest_index.fqn}: the sharded state of a ringtrain checkpoint holds tensors only")


# -- the manager ----------------------------------------------------------------------------
class CheckpointManager:
    """Saves and loads the checkpoints of one run directory, collectively over `group`.

    `layout` (e.g. engine, parallel, ep_size) is recorded in meta.json; a checkpoint whose
    layout differs from this run's is refused naming trainer.resume, since the engine's
    sharded state would not fit."""

    def __init__(self, root: Path, *, rank: int, world_size: int, group=None, keep_last: int = 0,
                 layout: dict | None = None):
        self.root, self.rank, self.world_size, self.group = Path(root), rank, world_size, group
        self.keep_last, self.layout = keep_last, dict(layout or {})

    def save(self, step: int, state: EngineState, rank_state: dict) -> Path:
        """Collective: every rank calls it with the same step. Returns the final directory."""
        final, tmp = self.root / f"step_{step}", self.root / f".tmp_step_{step}"
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)  # debris of a crashed save
            tmp.mkdir()
        self._barrier()
        if self.rank == 0:
            _atomic_save(state.model, tmp / "model.pt")
        if state.sharded:
            self._save_sharded(state.sharded, tmp / "optimizer")
        _atomic_save({"rng": rng_state(), "engine": state.local, **rank_state}, tmp / f"rank_{self.rank}.pt")
        self._barrier()
        if self.rank == 0:
            meta = {"format": FORMAT_VERSION, "step": step, "world_size": self.world_size, **self.layout,
                    "files": _inventory(tmp)}
            atomic_write(tmp / "meta.json", lambda fh: fh.write(json.dumps(meta, indent=1).encode()))
            fsync_dir(tmp)
            if final.exists():  # re-saving a step (e.g. after resuming at it): replace whole
                old = self.root / f".old_step_{step}"
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
                os.replace(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, final)
            fsync_dir(self.root)
            if self.keep_last > 0:
                for _, old_path in complete_checkpoints(self.root)[:-self.keep_last]:
                    shutil.rmtree(old_path, ignore_errors=True)
        self._barrier()
        return final

    def _save_sharded(self, sharded: dict, folder: Path) -> None:
        import torch.distributed.checkpoint as dcp

        bad = [k for k, v in sharded.items() if not torch.is_tensor(v)]
        if bad:
            raise TypeError(f"sharded state holds tensors only; not tensors: {bad[:5]}")
        dcp.save(sharded, checkpoint_id=str(folder), process_group=self.group)

    def load(self, path: Path, *, model: torch.nn.Module, device: torch.device,
             verify_files: bool = True) -> Restored:
        """Loads model.pt into `model` (before any wrapper) and this rank's state, restoring the RNG.
        With another world size every rank takes rank 0's state (sampler positions differ only by
        rank; the caller converts them). Raises ConfigError naming trainer.resume for an incomplete
        or damaged checkpoint, another model or another layout."""
        where = f"trainer.resume={str(path)!r}"
        if not (path / "meta.json").is_file():
            raise ConfigError(f"{where}: not a complete checkpoint (no meta.json)")
        problem = verify(path) if verify_files else None  # False: `latest` has just checked it
        if problem is not None:
            raise ConfigError(f"{where}: damaged checkpoint: {problem}")
        meta = read_meta(path)
        if meta.get("format") != FORMAT_VERSION:
            raise ConfigError(f"{where}: checkpoint format {meta.get('format')}, this version reads format "
                              f"{FORMAT_VERSION} only")
        for key, now in self.layout.items():
            saved = meta.get(key)
            if saved != now:
                raise ConfigError(f"{where}: saved with {_layout_key(key)}={saved}, this run uses "
                                  f"{_layout_key(key)}={now}; their saved states are laid out differently")
        resharded = meta["world_size"] != self.world_size
        rank_file = path / f"rank_{0 if resharded else self.rank}.pt"
        if not rank_file.is_file():
            raise ConfigError(f"{where}: {rank_file.name} is missing")
        try:
            model_state = read_model_state(path, device)
            state = torch.load(rank_file, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:  # weights_only refused an object: loading it could run code
            raise ConfigError(f"{where}: refused, it holds objects other than tensors and plain types "
                              f"({str(e).splitlines()[0][:200]})") from None
        try:
            model.load_state_dict(model_state)
        except RuntimeError as e:  # missing / unexpected keys or shapes: another model
            raise ConfigError(f"{where}: the checkpoint holds another model: {e}") from None
        set_rng_state(state.pop("rng"))
        return Restored(path, int(meta["step"]), state, resharded)

    def load_sharded(self, path: Path, template: dict) -> None:
        """Collective: fills `template` (the engine's sharded state, materialized) from the checkpoint."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

        if not template:
            return
        folder = path / "optimizer"
        if not (folder / ".metadata").is_file():
            raise ConfigError(f"trainer.resume: {folder} holds no sharded state (.metadata missing)")
        try:
            dcp.load(template, checkpoint_id=str(folder), process_group=self.group,
                     planner=_TensorsOnlyLoadPlanner())
        except (Exception, CheckpointException) as e:  # another layout, or a missing shard file
            raise ConfigError(f"trainer.resume: cannot read the sharded state in {folder}: {e}") from None

    def _barrier(self) -> None:
        if dist.is_initialized() and dist.get_world_size(self.group) > 1:
            dist.barrier(self.group)


def _layout_key(key: str) -> str:
    return {"ep_size": "parallel.ep_size"}.get(key, key)


def _atomic_save(obj, path: Path) -> None:
    atomic_write(path, lambda fh: torch.save(obj, fh))
