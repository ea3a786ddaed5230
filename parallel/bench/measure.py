"""One benchmark case: buffers with an exactly known result, a check, and a timer.

Inputs are small non-negative integers, (7 i + 3 r) mod 17 on rank r at element
i (times p for avg), so every sum, max, min and average over up to 15 ranks is
exactly representable in every benchmarked dtype: a correct algorithm has 0
wrong elements, whatever the dtype.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from ..collectives import Communicator, split_bounds
from .timing import sync, time_calls

BUSBW_FACTOR = {
    "all_reduce": lambda p: 2 * (p - 1) / p,
    "reduce_scatter": lambda p: (p - 1) / p,
    "all_gather": lambda p: (p - 1) / p,
    "all_to_all": lambda p: (p - 1) / p,
    "broadcast": lambda p: 1.0,
}


def element_count(op: str, size_bytes: int, elem_size: int, world: int) -> int:
    """Elements of the full buffer; ops that cut it in p equal pieces round down to p's multiple."""
    count = max(1, size_bytes // elem_size)
    if op in ("reduce_scatter", "all_gather", "all_to_all"):
        count = max(world, count - count % world)
    return count


def pattern(rank: int, index: torch.Tensor, scale: int) -> torch.Tensor:
    return ((index * 7 + rank * 3) % 17) * scale


def _reduce(values: list[torch.Tensor], op: str, world: int) -> torch.Tensor:
    stack = torch.stack(values)
    if op == "sum":
        return stack.sum(0)
    if op == "avg":
        return stack.sum(0) / world
    return stack.max(0).values if op == "max" else stack.min(0).values


@dataclass
class Case:
    run: Callable[[], None]
    result: torch.Tensor
    expected: torch.Tensor  # float64, on CPU


def build_case(comm: Communicator, op: str, count: int, dtype: torch.dtype, reduce_op: str,
               device: torch.device) -> Case:
    p, r = comm.world_size, comm.rank
    scale = p if reduce_op == "avg" else 1
    idx = torch.arange(count, dtype=torch.float64)
    mine = pattern(r, idx, scale)
    everyone = [pattern(q, idx, scale) for q in range(p)]
    on_dev = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    b = split_bounds(count, p)
    if op == "all_reduce":
        buf = on_dev(mine)
        return Case(lambda: comm.all_reduce(buf, op=reduce_op), buf, _reduce(everyone, reduce_op, p))
    if op == "broadcast":
        buf = on_dev(mine)
        return Case(lambda: comm.broadcast(buf, 0), buf, everyone[0])
    if op == "reduce_scatter":
        inp, out = on_dev(mine), torch.empty(b[r + 1] - b[r], dtype=dtype, device=device)
        exp = _reduce(everyone, reduce_op, p)[b[r]:b[r + 1]]
        return Case(lambda: comm.reduce_scatter(out, inp, op=reduce_op), out, exp)
    if op == "all_gather":
        inp, out = on_dev(mine[b[r]:b[r + 1]]), torch.empty(count, dtype=dtype, device=device)
        exp = torch.cat([everyone[q][b[q]:b[q + 1]] for q in range(p)])
        return Case(lambda: comm.all_gather(out, inp), out, exp)
    if op == "all_to_all":
        # piece j of rank r's input goes to rank j; piece i of the output comes from rank i
        inp, out = on_dev(mine), torch.empty(count, dtype=dtype, device=device)
        exp = torch.cat([everyone[q][b[r]:b[r + 1]] for q in range(p)])
        return Case(lambda: comm.all_to_all(out, inp), out, exp)
    raise ValueError(f"unknown op {op!r}")


def count_wrong(case: Case) -> int:
    case.run()
    got = case.result.detach().to("cpu", torch.float64)
    return int((got != case.expected).sum())


def time_case(case: Case, warmup: int, iters: int, device: torch.device, group) -> float:
    """Mean seconds per call over the ranks (parallel/bench/timing.py's convention)."""
    return time_calls(case.run, warmup=warmup, iters=iters, device=device, group=group)


def memcpy_bandwidth(device: torch.device, nbytes: int = 64 << 20, iters: int = 10) -> float:
    """GB/s of one large device-memory copy (bytes copied per second): the node's ceiling."""
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        dst.copy_(src)
    sync(device)
    return nbytes * iters / (time.perf_counter() - t0) / 1e9
