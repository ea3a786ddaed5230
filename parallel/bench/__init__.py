"""The collective benchmark (`python -m parallel.bench`), in the manner of nccl-tests."""

from .config import BenchConfig, make_plan, parse_bytes
from .run import run_bench

__all__ = ["BenchConfig", "make_plan", "parse_bytes", "run_bench"]
