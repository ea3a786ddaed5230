"""What every bucket's collectives run: printed once at start and recorded in the run directory.

With `parallel.algorithm=auto` this is also where the choice is made: communicators whose
layout the tuning file (`parallel.tuning`) does not describe are calibrated first, within
`parallel.calibration_s` seconds in all, on their own groups, at the sizes the buckets have;
the measurements are kept as `<run dir>/tuning.json`, a tuning file for the next run.
`<run dir>/collectives.json` lists, per bucket and op, the bytes, the algorithm and its
predicted time (interpolated from the measurements; null without any).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from parallel.collectives import AUTO, Communicator, calibrate
from parallel.collectives.autotune import DTYPE_NAMES
from parallel.mesh import Comms

log = logging.getLogger("ringtrain.train")


@dataclass
class BucketCollective:
    """One collective a bucket issues every step."""

    bucket: int
    group: str
    op: str
    bytes: int
    dtype: str
    algorithm: str
    predicted_ms: float | None


def _traffic(wrapper) -> list[tuple[object, str, int, torch.dtype]]:
    """(unit, op, bytes, dtype) of every collective a unit issues per step."""
    out = []
    for u in wrapper.units:
        if u.comm.world_size == 1:
            continue
        if not u.sharded or u.grad_full is not None:
            out.append((u, "all_reduce", u.padded * u.grad_dtype.itemsize, u.grad_dtype))
        else:
            out.append((u, "reduce_scatter", u.padded * u.grad_dtype.itemsize, u.grad_dtype))
        if u.sharded:
            dtype = u.full.dtype if u.full is not None else u.shard.dtype
            out.append((u, "all_gather", u.padded * dtype.itemsize, dtype))
    return out


def _name(comms: Comms, comm: Communicator) -> str:
    for name in ("dp", "ep", "expert_dp"):
        if getattr(comms, name) is comm:
            return name
    return "?"


def plan_collectives(wrapper, comms: Comms, *, calibration_s: float, device: torch.device,
                     run_dir: Path, rank: int) -> list[BucketCollective]:
    """Collective (every rank calls it): calibrates auto's communicators that lack a table,
    then logs and records every bucket's collectives (rank 0 writes)."""
    traffic = _traffic(wrapper)
    need = [c for c in comms.all() if c.algorithm == AUTO and c.table is None and c.world_size > 1]
    calibrated = {}
    for comm in need:
        mine = [t for t in traffic if t[0].comm is comm]
        if comm is comms.ep:
            ops, biggest, dtype = ["all_to_all"], 4 << 20, torch.float32
        elif mine:
            ops = list(dict.fromkeys(t[1] for t in mine))
            biggest, dtype = max(t[2] for t in mine), mine[0][3]
        else:
            continue
        sizes = sorted({t[2] for t in mine}) if mine else None  # the buckets' own sizes
        comm.table = calibrate(comm, ops, max_bytes=biggest, budget_s=calibration_s / len(need),
                               dtype=dtype, device=device, sizes=sizes)
        calibrated[_name(comms, comm)] = comm.table
    rows = []
    for unit, op, nbytes, dtype in traffic:
        algo = unit.comm.algorithm_for(op, nbytes, dtype)
        table = unit.comm.table
        secs = table.predict_s(op, DTYPE_NAMES.get(dtype, "float32"), nbytes, algo) if table else None
        rows.append(BucketCollective(unit.index, _name(comms, unit.comm), op, nbytes, DTYPE_NAMES.get(dtype, "?"),
                                     algo, None if secs is None else secs * 1e3))
    if rank == 0:
        _report(rows, comms, calibrated, run_dir)
    return rows


def _report(rows: list[BucketCollective], comms: Comms, calibrated: dict, run_dir: Path) -> None:
    dp = comms.dp
    sources = {_name(comms, c): (c.table.source if c.table is not None else None) for c in comms.all()}
    log.info(f"collectives: parallel.algorithm={dp.algorithm}, {dp.layout.describe()}"
             + "".join(f" | {g}: {s}" for g, s in sources.items() if s))
    for r in rows:
        pred = f"{r.predicted_ms:9.3f} ms" if r.predicted_ms is not None else "        n/a"
        log.info(f"  bucket {r.bucket:3d} {r.group:>9} {r.op:>14} {r.bytes / 2**20:9.3f} MiB {r.dtype:>8} "
                 f"-> {r.algorithm:<6} predicted {pred}")
    run_dir.mkdir(parents=True, exist_ok=True)
    record = {"algorithm": dp.algorithm, "layout": dp.layout.describe(), "tables": sources,
              "buckets": [asdict(r) for r in rows]}
    (run_dir / "collectives.json").write_text(json.dumps(record, indent=1))
    if "dp" in calibrated:
        calibrated["dp"].save(run_dir / "tuning.json")

