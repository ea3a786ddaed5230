"""The one timer every benchmark uses, trial interleaving, and peak memory.

Timing convention (the same for collectives, training steps, layers): warm-up calls, the
device synchronised, a barrier over the group, `iters` back-to-back calls timed on the
host, the device synchronised again; the figure is the mean over the group's ranks of
seconds per call. Absolute times on shared machines are noise, so benchmarks compare
peers measured in the same run: `interleaved` runs trial after trial, every case once per
trial in a fixed order (A B C A B C ...), so a slow phase of the machine hits them alike.
"""

from __future__ import annotations

import resource
import statistics
import time
from typing import Callable

import torch
import torch.distributed as dist


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


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process: allocated on CUDA (since the last reset), resident set on CPU
    (since the process started: the operating system keeps no resettable peak)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
