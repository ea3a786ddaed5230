"""The collective benchmark's configuration (configs/bench.yaml), validated up front."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

import torch

from ..collectives import ALGORITHMS, AUTO, OPS, REDUCE_OPS, TuningTable

MODES = ("sweep", "tune")

DTYPES = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
    "float64": torch.float64, "int32": torch.int32, "int64": torch.int64,
    "int8": torch.int8, "uint8": torch.uint8,
}
_UNITS = {"": 1, "B": 1, "K": 1 << 10, "KB": 1 << 10, "KIB": 1 << 10, "M": 1 << 20, "MB": 1 << 20,
          "MIB": 1 << 20, "G": 1 << 30, "GB": 1 << 30, "GIB": 1 << 30}


def parse_bytes(value, key: str) -> int:
    """'8' -> 8, '64K' -> 65536, '64M' -> 67108864 (binary units, as nccl-tests)."""
    m = re.fullmatch(r"\s*(\d+)\s*([A-Za-z]*)\s*", str(value))
    if not m or m.group(2).upper() not in _UNITS:
        raise ValueError(f"{key}={value!r} is not a byte size (examples: 8, 64K, 64M, 1G)")
    return int(m.group(1)) * _UNITS[m.group(2).upper()]


@dataclass
class BenchConfig:
    """nccl-tests-style sweep over ops, algorithms and message sizes."""

    mode: str = "sweep"
    """sweep: measure and report; tune: measure every algorithm and write tuning.json for `auto`."""
    ops: list[str] = field(default_factory=lambda: ["all_reduce"])
    """Collectives to measure: all_reduce, reduce_scatter, all_gather, all_to_all, broadcast."""
    algorithms: list[str] = field(default_factory=lambda: list(ALGORITHMS) + [AUTO])
    """Algorithms to compare (auto: what training would choose); pairs an algorithm does not
    implement are skipped and listed. mode=tune measures every algorithm whatever this says."""
    tuning: Optional[str] = None
    """The auto row's tuning file; none (or one for another layout): calibrate at start, as training does."""
    calibration_s: float = 5.0
    """Seconds the auto row's start-up calibration may take."""
    min_bytes: str = "8"
    """Smallest message (bytes; K/M/G suffixes are binary)."""
    max_bytes: str = "64M"
    """Largest message; sizes are the powers of two from min_bytes to max_bytes."""
    dtype: str = "float32"
    """Element type: float32, float16, bfloat16, float64, int32, int64, int8, uint8."""
    reduce_op: str = "sum"
    """Reduction for all_reduce and reduce_scatter: sum, avg, max, min."""
    iters: int = 20
    """Timed calls per (op, algorithm, size)."""
    warmup: int = 5
    """Untimed calls before the timed ones."""
    check: bool = True
    """Check one call's result against the exact expected value and count wrong elements."""
    segment_bytes: str = "4M"
    """Pipeline segment size of the hand-written algorithms."""
    window: int = 2
    """Segments in flight at once (>= 2)."""
    large_min_bytes: str = "16M"
    """Summary: sizes from here up are 'large' (busbw ratio to native)."""
    small_max_bytes: str = "4K"
    """Summary: sizes up to here are 'small' (latency ratio to native)."""
    backend: str = "auto"
    """auto (nccl with GPUs, else gloo), gloo or nccl."""
    plot: bool = True
    """Write busbw.png."""
    progress: bool = True
    """Progress bar on rank 0."""


@dataclass(frozen=True)
class BenchPlan:
    """BenchConfig turned into checked values."""

    mode: str
    ops: tuple[str, ...]
    algorithms: tuple[str, ...]
    sizes: tuple[int, ...]
    dtype: torch.dtype
    dtype_name: str
    reduce_op: str
    iters: int
    warmup: int
    check: bool
    segment_bytes: int
    window: int
    large_min_bytes: int
    small_max_bytes: int
    backend: str
    tuning: TuningTable | None
    calibration_s: float


def _choices(key: str, values, allowed) -> tuple[str, ...]:
    values = [values] if isinstance(values, str) else list(values)
    if not values:
        raise ValueError(f"{key} is empty; choose from {list(allowed)}")
    for v in values:
        if v not in allowed:
            raise ValueError(f"{key} has {v!r}; choose from {list(allowed)}")
    return tuple(dict.fromkeys(values))


def make_plan(cfg) -> BenchPlan:
    """Checks every field, naming the key at fault, before any process group exists."""
    if cfg.mode not in MODES:
        raise ValueError(f"mode={cfg.mode!r}; choose from {list(MODES)}")
    ops = _choices("ops", cfg.ops, OPS)
    algorithms = _choices("algorithms", cfg.algorithms, ALGORITHMS + (AUTO,))
    if cfg.mode == "tune":
        algorithms = ALGORITHMS
    if not cfg.calibration_s > 0:
        raise ValueError(f"calibration_s must be > 0, got {cfg.calibration_s!r}")
    tuning = TuningTable.load(cfg.tuning, key="tuning") if cfg.tuning is not None else None
    lo, hi = parse_bytes(cfg.min_bytes, "min_bytes"), parse_bytes(cfg.max_bytes, "max_bytes")
    if lo <= 0:
        raise ValueError(f"min_bytes must be > 0, got {cfg.min_bytes!r}")
    if hi < lo:
        raise ValueError(f"max_bytes={cfg.max_bytes!r} is smaller than min_bytes={cfg.min_bytes!r}")
    if cfg.dtype not in DTYPES:
        raise ValueError(f"dtype={cfg.dtype!r}; choose from {list(DTYPES)}")
    if cfg.reduce_op not in REDUCE_OPS:
        raise ValueError(f"reduce_op={cfg.reduce_op!r}; choose from {list(REDUCE_OPS)}")
    if cfg.reduce_op == "avg" and not DTYPES[cfg.dtype].is_floating_point:
        raise ValueError(f"reduce_op=avg needs a floating dtype, got dtype={cfg.dtype}")
    if cfg.iters <= 0:
        raise ValueError(f"iters must be > 0, got {cfg.iters}")
    if cfg.warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {cfg.warmup}")
    if cfg.window < 2:
        raise ValueError(f"window must be >= 2, got {cfg.window}")
    seg = parse_bytes(cfg.segment_bytes, "segment_bytes")
    if seg <= 0:
        raise ValueError(f"segment_bytes must be > 0, got {cfg.segment_bytes!r}")
    if cfg.backend not in ("auto", "gloo", "nccl"):
        raise ValueError(f"backend={cfg.backend!r}; choose from ['auto', 'gloo', 'nccl']")
    sizes, s = [], 1
    while s <= hi:
        if s >= lo:
            sizes.append(s)
        s *= 2
    if not sizes:
        sizes = [lo]
    return BenchPlan(cfg.mode, ops, algorithms, tuple(sizes), DTYPES[cfg.dtype], cfg.dtype, cfg.reduce_op,
                     int(cfg.iters), int(cfg.warmup), bool(cfg.check), seg, int(cfg.window),
                     parse_bytes(cfg.large_min_bytes, "large_min_bytes"),
                     parse_bytes(cfg.small_max_bytes, "small_max_bytes"), cfg.backend, tuning,
                     float(cfg.calibration_s))
