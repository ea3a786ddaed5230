"""The one timer every benchmark uses, trial interleaving, and peak memory.

Timing convention (the same for collectives, training steps, layers): warm-up calls, the
device synchronised, a barrier over the group, `iters` back-to-back calls timed on the
host, the device synchronised again; the figure is the mean over the group's ranks of
seconds per call. Absolute times on shared machines are noise, so benchmarks compare
peers measured in the same run: `interleaved` runs trial after trial, every case once per
trial in a fixed order (A B C A B C ...), so a slow phase of the machine hits them alike.

Memory: `peak_memory_mb` is the process's peak so far; `PeakMemory` the growth of that peak
over a baseline taken when it is made, what one case (a layer's passes, a training launch's
steps) adds to what was there before it.
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Callable

import torch
import torch.distributed as dist

from ..memory import peak_memory_mb, reset_peak_memory


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _distributed(group) -> bool:
    return dist.is_initialized() and dist.get_world_size(group) > 1


def time_calls(fn: Callable[[], object], *, warmup: int, iters: int, device: torch.device, group=None) -> float:
    """Mean seconds per call of fn() (see the module docstring); collective when `group` has > 1 rank."""
    for _ in range(warmup):
        fn()
    sync(device)
    if _distributed(group):
        dist.barrier(group=group)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    sync(device)
    seconds = (time.perf_counter() - t0) / iters
    if not _distributed(group):
        return seconds
    t = torch.tensor([seconds], dtype=torch.float64, device=device)
    dist.all_reduce(t, group=group)
    return t.item() / dist.get_world_size(group)


def interleaved(cases: dict[str, Callable[[], object]], *, trials: int, warmup: int, iters: int,
                device: torch.device, group=None) -> dict[str, list[float]]:
    """Seconds per call of every case in every trial, trials interleaved (see the module docstring)."""
    out: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(trials):
        for name, fn in cases.items():
            out[name].append(time_calls(fn, warmup=warmup, iters=iters, device=device, group=group))
    return out


def spread(samples: list[float]) -> dict[str, float]:
    """Median, min and max of per-trial figures."""
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples)}


def _resident_mb() -> float | None:
    """Resident set size now (Linux /proc; None elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return None


class PeakMemory:
    """Peak memory growth over a baseline taken at construction (the device synchronised first).

    CUDA: the allocator's peak since a reset made here, minus the bytes allocated then: exact
    tensor bytes. CPU: the growth of the peak resident set (ru_maxrss), the only peak the
    operating system keeps: resident pages, not tensor bytes (allocator slack and libraries
    paged in count), and it reads low when an earlier peak already lay above the resident size
    at the baseline; `slack_mb` (that earlier peak minus the resident size then) bounds it."""

    def __init__(self, device: torch.device):
        self.device = device
        sync(device)
        reset_peak_memory(device)
        self.baseline_mb = torch.cuda.memory_allocated(device) / 2**20 if device.type == "cuda" \
            else peak_memory_mb(device)
        resident = None if device.type == "cuda" else _resident_mb()
        self.slack_mb = 0.0 if resident is None else max(0.0, self.baseline_mb - resident)

    def growth_mb(self) -> float:
        sync(self.device)
        return peak_memory_mb(self.device) - self.baseline_mb

    @property
    def method(self) -> str:
        if self.device.type == "cuda":
            return "cuda max_memory_allocated growth (tensor bytes)"
        return "ru_maxrss growth (resident set, not tensor bytes)"
