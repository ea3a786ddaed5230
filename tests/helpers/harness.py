"""A pool of gloo worker processes, spawned once and reused for many cases.

`WorkerPool(p).run("module:function", **kwargs)` calls function(rank, world,
**kwargs) on every rank and returns the p results (rank order). A case that
raises comes back as a `WorkerError` naming the rank; a case that does not
answer within its timeout kills the pool, so a hang fails the test instead of
stalling the suite. Workers import case functions by name, so cases live in
ordinary modules (tests/helpers/*_cases.py).
"""

from __future__ import annotations

import importlib
import multiprocessing as mp
import os
import tempfile
import traceback


class WorkerError(RuntimeError):
    pass


def _worker(rank: int, world: int, init_file: str, conn) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import datetime

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    while True:
        msg = conn.recv()
        if msg is None:
            break
        target, kwargs = msg
        try:
            mod, fn = target.split(":")
            result = getattr(importlib.import_module(mod), fn)(rank, world, **kwargs)
            conn.send(("ok", result))
        except BaseException:  # reported to the test, which fails with the traceback
            conn.send(("err", traceback.format_exc()))
    conn.close()
    # Nothing is left to save: skip destroy_process_group (it waits on ranks that may already have
    # gone) and the interpreter's teardown of torch (1-2 s per worker).
    os._exit(0)


class WorkerPool:
    def __init__(self, world_size: int):
        self.world_size = world_size
        self._dir = tempfile.mkdtemp(prefix="ringtrain-pool-")
        init_file = os.path.join(self._dir, "init")
        ctx = mp.get_context("spawn")
        self._conns, self._procs = [], []
        for rank in range(world_size):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker, args=(rank, world_size, init_file, child), daemon=True)
            proc.start()
            self._conns.append(parent)
            self._procs.append(proc)
        self.broken = False

    def run(self, target: str, timeout: float = 180.0, **kwargs) -> list:
        if self.broken:
            raise WorkerError("worker pool is broken by an earlier failure")
        for conn in self._conns:
            conn.send((target, kwargs))
        results, errors = [], []
        for rank, conn in enumerate(self._conns):
            if not conn.poll(timeout):
                self.close(force=True)
                raise WorkerError(f"rank {rank} gave no answer to {target} within {timeout} s (hang?)")
            status, value = conn.recv()
            if status == "err":
                errors.append(f"rank {rank}:\n{value}")
            results.append(value)
        if errors:
            raise WorkerError(f"{target} failed\n" + "\n".join(errors))
        return results

    def close(self, force: bool = False) -> None:
        self.broken = True
        for conn, proc in zip(self._conns, self._procs):
            if not force and proc.is_alive():
                try:
                    conn.send(None)
                except (BrokenPipeError, OSError):
                    pass
        for proc in self._procs:
            proc.join(timeout=0 if force else 20)
            if proc.is_alive():
                proc.kill()
                proc.join()
