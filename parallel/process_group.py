"""Starting and stopping torch.distributed, the backend chosen from the device.

Under torchrun the environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR ...)
describes the job; run as plain `python` it is a world of one. CUDA machines
get NCCL with one GPU per local rank, everything else gets gloo on the CPU:
the same code runs on both.

`timeout_s` is the process group's timeout: on gloo any send, receive or
collective waiting longer raises; on NCCL the watchdog aborts the process
(TORCH_NCCL_ASYNC_ERROR_HANDLING, set to 3 = tear down unless already set).
ringtrain's own collectives report hangs more precisely: see
`Communicator(timeout_s=...)` and `collectives/timeouts.py`.
"""

from __future__ import annotations

import datetime
import logging
import os
import sys
from dataclasses import dataclass
from typing import NoReturn

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in the job."""

    rank: int
    world_size: int
    local_rank: int
    backend: str
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_backend(requested: str = "auto") -> str:
    if requested not in ("auto", "gloo", "nccl"):
        raise ValueError(f"backend must be auto, gloo or nccl, got {requested!r}")
    if requested == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    if requested == "nccl" and not torch.cuda.is_available():
        raise ValueError("backend 'nccl' needs CUDA GPUs, and none is visible")
    return requested


def init_distributed(backend: str = "auto", timeout_s: float = 600.0) -> DistContext:
    """Joins the job torchrun started, or makes a world of one when there is none.

    Backend operations (and the rendezvous) fail after `timeout_s` seconds."""
    backend = pick_backend(backend)
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if backend == "nccl":
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "3")  # a timed-out collective ends the process
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s)
        kwargs = {"device_id": device} if backend == "nccl" else {}
        if launched:
            dist.init_process_group(backend, timeout=timeout, **kwargs)
        else:  # a world of one: an in-process store, no port to pick (and lose to another process)
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout,
                                    **kwargs)
    return DistContext(rank, world, local_rank, backend, device)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def abort_process(message: str | None, exit_code: int = 1) -> NoReturn:
    """Prints `message` (unless None) as one line on stderr and ends the process now.

    For errors after which the process group cannot be used (a `CollectiveTimeout`):
    a send or receive stuck in the backend cannot be cancelled, and a normal exit
    (or destroy_process_group) would wait for it up to the process group's own
    timeout. Flushes logging, stdout and stderr, then os._exit: `finally` blocks
    and atexit handlers do not run.

    Also the last call of a finished entry point (`exit_code=0`): the interpreter's
    own teardown of torch's modules costs 1-2 s per process on a small CPU, paid by
    every rank of every launch, and there is nothing left for it to do.
    """
    try:
        logging.shutdown()
        sys.stdout.flush()
        if message is not None:
            sys.stderr.write(message.rstrip("\n") + "\n")
        sys.stderr.flush()
    finally:
        os._exit(exit_code)
