"""The algorithm registry: one table of (op, algorithm name) -> implementation.

Implementations share one signature per op and work on flat, contiguous
buffers that the public functions in `api.py` have already validated:

    all_reduce(tp, flat, op, tuning)                        in place
    reduce_scatter(tp, out, inp, op, tuning)                out = this rank's piece
    all_gather(tp, out, inp, tuning)                        inp = this rank's piece
    all_to_all(tp, out, inp, out_splits, in_splits, tuning)
    broadcast(tp, flat, src, tuning)                        in place, src a group rank

Pieces follow `split_bounds(numel, world_size)`: sizes differ by at most one,
the first numel % world_size ranks holding the extra element.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, get_args

AlgorithmName = Literal["ring", "rhd", "tree", "native", "hier"]
ALGORITHMS: tuple[str, ...] = get_args(AlgorithmName)
AUTO = "auto"
"""Not an implementation: a Communicator with algorithm="auto" picks one per op and size (autotune.py)."""
OpName = Literal["all_reduce", "reduce_scatter", "all_gather", "all_to_all", "broadcast"]
OPS: tuple[str, ...] = get_args(OpName)


@dataclass(frozen=True)
class Tuning:
    """How the hand-written algorithms cut a buffer into pipelined segments."""

    segment_bytes: int = 4 << 20
    """Target bytes per message segment; a piece of at least 2 elements is cut into >= 2."""
    window: int = 2
    """Segments in flight at once (>= 2, so one is reduced while the next travels)."""
    min_split_bytes: int = 64 << 10
    """Pieces under twice this travel as one message (latency beats overlap there)."""

    def __post_init__(self):
        if self.segment_bytes <= 0:
            raise ValueError(f"segment_bytes must be > 0, got {self.segment_bytes}")
        if self.min_split_bytes < 0:
            raise ValueError(f"min_split_bytes must be >= 0, got {self.min_split_bytes}")
        if self.window < 2:
            raise ValueError(f"window must be >= 2, got {self.window}")


_TABLE: dict[str, dict[str, Callable]] = {op: {} for op in OPS}


def register(op: str, algorithm: str):
    """Decorator that files an implementation under (op, algorithm)."""
    if op not in _TABLE or algorithm not in ALGORITHMS:
        raise ValueError(f"cannot register unknown op/algorithm {op!r}/{algorithm!r}")

    def deco(fn):
        _TABLE[op][algorithm] = fn
        return fn

    return deco


def lookup(op: str, algorithm: str) -> Callable:
    if op not in _TABLE:
        raise ValueError(f"op must be one of {list(OPS)}, got {op!r}")
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {list(ALGORITHMS)}, got {algorithm!r}")
    impls = _TABLE[op]
    if algorithm not in impls:
        raise ValueError(
            f"algorithm {algorithm!r} has no {op}; algorithms for {op}: {sorted(impls)}"
        )
    return impls[algorithm]


def available(op: str) -> list[str]:
    """Algorithm names implemented for `op`, in ALGORITHMS order."""
    return [a for a in ALGORITHMS if a in _TABLE[op]]
