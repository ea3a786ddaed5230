"""`auto`: per op, dtype and message size, the algorithm measured fastest on this job's layout.

A `TuningTable` holds measurements (seconds per call of every candidate algorithm at a
set of sizes) for one layout: world size, nodes x ranks per node, backend. It comes from a
tuning file (`python -m parallel.bench mode=tune` writes one; training reads it with
`parallel.tuning=PATH`) or from `calibrate`, a time-boxed measurement at start-up on the
communicator's own group. A message of n bytes takes the best algorithm of the measured
size nearest to n on a log scale; a dtype that was not measured takes the table's
measurements of the same op at the same byte count (bytes, not elements, set the cost).

The file (JSON):

    {"format": "ringtrain-tuning/1", "world_size": 4, "nodes": 2, "ranks_per_node": 2,
     "backend": "gloo", "source": "...",
     "entries": [{"op": "all_reduce", "dtype": "float32", "size_bytes": 1048576,
                  "seconds": {"ring": 0.0121, "hier": 0.0083, ...}}, ...]}

Every rank must choose alike: a table is read or measured identically everywhere, and
calibration hands rank 0's measurements to every rank.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from .nodes import NodeLayout
from .registry import ALGORITHMS, OPS

FORMAT = "ringtrain-tuning/1"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "float64": torch.float64, "int32": torch.int32, "int64": torch.int64,
           "int8": torch.int8, "uint8": torch.uint8}
DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}


@dataclass(frozen=True)
class Entry:
    """Seconds per call of each measured algorithm, for one op, dtype and size."""

    op: str
    dtype: str
    size_bytes: int
    seconds: dict[str, float]

    def best(self, allowed) -> str | None:
        times = {a: t for a, t in self.seconds.items() if a in allowed}
        return min(times, key=lambda a: (times[a], a)) if times else None


class TuningTable:
    """Measurements for one layout; `choose` and `predict_s` answer for any size."""

    def __init__(self, *, world_size: int, nodes: int, ranks_per_node: int | None, backend: str,
                 entries: list[Entry], source: str):
        self.world_size, self.nodes, self.ranks_per_node = world_size, nodes, ranks_per_node
        self.backend, self.entries, self.source = backend, entries, source

    # -- reading and writing ---------------------------------------------
    @classmethod
    def load(cls, path: str | os.PathLike, key: str = "parallel.tuning") -> "TuningTable":
        """Reads and checks a tuning file; anything wrong is a ValueError naming `key` and the path."""
        try:
            raw = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ValueError(f"{key}={path}: no such file") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{key}={path}: not a readable JSON tuning file ({e})") from None
        return cls.from_json(raw, source=str(path), where=f"{key}={path}")

    @classmethod
    def from_json(cls, raw, *, source: str, where: str) -> "TuningTable":
        """The table a tuning file's JSON describes, checked; errors are ValueErrors starting with `where`."""
        def bad(why):
            return ValueError(f"{where}: {why}")
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise bad(f"not a ringtrain tuning file (format must be {FORMAT!r})")
        try:
            world, nodes, rpn = int(raw["world_size"]), int(raw["nodes"]), raw["ranks_per_node"]
            rpn = None if rpn is None else int(rpn)
            backend = str(raw["backend"])
            entries = []
            for i, e in enumerate(raw["entries"]):
                op, dtype, size = e["op"], e["dtype"], int(e["size_bytes"])
                secs = {str(a): float(t) for a, t in e["seconds"].items()}
                if op not in OPS or dtype not in _DTYPES or size <= 0 or not secs:
                    raise bad(f"entry {i} is malformed: {e}")
                for a, t in secs.items():
                    if a not in ALGORITHMS or not (t > 0 and math.isfinite(t)):
                        raise bad(f"entry {i} has algorithm {a!r} with time {t!r}")
                entries.append(Entry(op, dtype, size, secs))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            if isinstance(e, ValueError) and str(e).startswith(where):
                raise
            raise bad(f"damaged: {type(e).__name__}: {e}") from None
        if world < 1 or nodes < 1 or not entries:
            raise bad("damaged: no layout or no entries")
        return cls(world_size=world, nodes=nodes, ranks_per_node=rpn, backend=backend, entries=entries,
                   source=source)

    def to_json(self) -> dict:
        return {"format": FORMAT, "world_size": self.world_size, "nodes": self.nodes,
                "ranks_per_node": self.ranks_per_node, "backend": self.backend, "source": self.source,
                "entries": [{"op": e.op, "dtype": e.dtype, "size_bytes": e.size_bytes, "seconds": e.seconds}
                            for e in self.entries]}

    def save(self, path: str | os.PathLike) -> None:
        """Written whole or not at all (a temporary file renamed into place)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tuning-")
        with os.fdopen(fd, "w") as f:
            json.dump(self.to_json(), f, indent=1)
        os.replace(tmp, path)

    # -- answering -------------------------------------------------------
    def mismatch(self, *, world_size: int, layout: NodeLayout, backend: str) -> str | None:
        """Why this table does not describe the job (None: it does)."""
        mine = f"{self.world_size} ranks as {self.nodes} x {self.ranks_per_node} on {self.backend}"
        job = f"{world_size} ranks as {layout.nodes} x {layout.ranks_per_node} on {backend}"
        same = (self.world_size, self.nodes, self.ranks_per_node, self.backend) == \
            (world_size, layout.nodes, layout.ranks_per_node, backend)
        return None if same else f"it was measured for {mine}, this job is {job}"

    def _nearest(self, op: str, dtype: str, nbytes: int) -> Entry | None:
        cands = [e for e in self.entries if e.op == op and e.dtype == dtype] or \
                [e for e in self.entries if e.op == op]
        if not cands:
            return None
        x = math.log2(max(nbytes, 1))
        return min(cands, key=lambda e: (abs(math.log2(e.size_bytes) - x), e.size_bytes))

    def choose(self, op: str, dtype: str, nbytes: int, allowed) -> str | None:
        e = self._nearest(op, dtype, nbytes)
        return None if e is None else e.best(allowed)

    def predict_s(self, op: str, dtype: str, nbytes: int, algorithm: str) -> float | None:
        """Seconds per call, interpolated linearly in size between the measured sizes around n
        (scaled by size past the largest; the smallest's time below it: latency-bound)."""
        pts = sorted((e.size_bytes, e.seconds[algorithm]) for e in self.entries
                     if e.op == op and algorithm in e.seconds and e.dtype == dtype)
        if not pts:
            pts = sorted((e.size_bytes, e.seconds[algorithm]) for e in self.entries
                         if e.op == op and algorithm in e.seconds)
        if not pts:
            return None
        if nbytes <= pts[0][0]:
            return pts[0][1]
        for (s0, t0), (s1, t1) in zip(pts, pts[1:]):
            if nbytes <= s1:
                return t0 + (t1 - t0) * (nbytes - s0) / (s1 - s0)
        return pts[-1][1] * nbytes / pts[-1][0]


def calibration_sizes(max_bytes: int, min_bytes: int = 4 << 10) -> list[int]:
    """Powers of four from min_bytes up to max_bytes, and max_bytes itself, ascending."""
    sizes, s = [], min_bytes
    while s < max_bytes:
        sizes.append(s)
        s *= 4
    sizes.append(max(max_bytes, min_bytes))
    return sorted(set(sizes))


def calibrate(comm, ops: list[str], *, max_bytes: int, budget_s: float, dtype: torch.dtype,
              device: torch.device, candidates: list[str] | None = None,
              sizes: list[int] | None = None) -> TuningTable:
    """Collective over comm's group: measures every candidate algorithm for `ops` at `sizes`
    (the messages the job will send; default `calibration_sizes(max_bytes)`), the largest
    first and then the others from the smallest up, until `budget_s` is spent (at least one
    size is measured); returns rank 0's measurements on every rank."""
    from .registry import available

    tp = comm.transport
    group = comm.group
    name = DTYPE_NAMES.get(dtype, "float32")
    elem = torch.empty(0, dtype=dtype).element_size()
    spent, entries = 0.0, []
    comm.drain()
    started = time.perf_counter()
    order = sorted(set(sizes)) if sizes else calibration_sizes(max_bytes)
    order = order[-1:] + order[:-1]  # the largest matters most; then the cheap ones
    for size in order:
        for op in ops:
            algos = [a for a in (candidates or ALGORITHMS) if a in available(op)]
            if tp.levels is None:
                algos = [a for a in algos if a != "hier"]  # flat here: it would measure ring twice
            count = max(tp.size, size // elem)
            count -= count % tp.size
            secs = {a: _time_one(comm, op, a, count, dtype, device) for a in algos}
            entries.append(Entry(op, name, count * elem, secs))
        spent_t = torch.tensor([time.perf_counter() - started], dtype=torch.float64, device=device)
        dist.all_reduce(spent_t, op=dist.ReduceOp.MAX, group=group)
        spent = spent_t.item()
        if spent >= budget_s:
            break
    layout = comm.layout
    table = TuningTable(world_size=tp.size, nodes=layout.nodes, ranks_per_node=layout.ranks_per_node,
                        backend=str(dist.get_backend(group)), entries=entries,
                        source=f"calibration at start-up ({spent:.1f} s of {budget_s:g} s)")
    box = [table.to_json()]
    dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0), group=group)
    return TuningTable.from_json(box[0], source=box[0]["source"], where="calibration")


def _time_one(comm, op: str, algorithm: str, count: int, dtype, device, iters: int = 2) -> float:
    """Seconds per call (one warm-up, `iters` timed), the slowest rank's."""
    from . import api

    tp = comm.transport
    p = tp.size
    buf = torch.ones(count, dtype=dtype, device=device)
    piece = torch.ones(count // p, dtype=dtype, device=device)
    if op == "all_reduce":
        run = api.plan_all_reduce(tp, buf, algorithm=algorithm, tuning=comm.tuning)
    elif op == "reduce_scatter":
        run = api.plan_reduce_scatter(tp, piece, buf, algorithm=algorithm, tuning=comm.tuning)
    elif op == "all_gather":
        run = api.plan_all_gather(tp, buf, piece, algorithm=algorithm, tuning=comm.tuning)
    elif op == "all_to_all":
        out = torch.empty_like(buf)
        run = api.plan_all_to_all(tp, out, buf, algorithm=algorithm, tuning=comm.tuning)
    else:
        run = api.plan_broadcast(tp, buf, 0, algorithm=algorithm, tuning=comm.tuning)
    run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dist.barrier(group=comm.group)
    t0 = time.perf_counter()
    for _ in range(iters):
        run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t = torch.tensor([(time.perf_counter() - t0) / iters], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=comm.group)
    return t.item()
