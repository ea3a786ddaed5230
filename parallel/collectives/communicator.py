"""`Communicator`: one process group + one algorithm, with synchronous and
asynchronous forms of every collective.

Asynchronous calls run on one background thread per communicator, strictly in
submission order, so every rank issues the same messages in the same order.
A synchronous call first waits for the queued ones for the same reason. The
thread only moves bytes and reduces (torch releases the GIL for both), so
backward keeps computing while a gradient bucket is on the wire.

On CUDA the background work runs on its own stream, ordered after the work
the caller had queued when it submitted; `Handle.wait()` makes the caller's
stream wait for it, so no host synchronisation is needed.

Every collective gets a sequence number (1, 2, ... per communicator, in issue
order, hence the same call has the same number on every rank). With
`timeout_s`, a collective that cannot finish within timeout_s of starting to
run, because a peer stopped taking part, raises `CollectiveTimeout` (one line
naming op, algorithm, number and missing ranks, see timeouts.py) from the
synchronous call or from `Handle.wait`; the communicator is unusable after it.
"""

from __future__ import annotations

import queue
import threading
import time

import torch

from . import api
from .registry import ALGORITHMS, Tuning
from .timeouts import CollectiveTimeout, PeerFailure, diagnose
from .transport import CommStats, Transport


class Handle:
    """A collective in flight; `wait()` blocks until it is done and re-raises its error."""

    def __init__(self, stats: CommStats):
        self._done = threading.Event()
        self._error: BaseException | None = None
        self._cuda_event = None
        self._stats = stats

    def _finish(self, error: BaseException | None, cuda_event=None) -> None:
        self._error, self._cuda_event = error, cuda_event
        self._done.set()

    def is_completed(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> None:
        t0 = time.perf_counter()
        if not self._done.wait(timeout):
            raise TimeoutError(f"collective not finished after {timeout} s")
        self._stats.wait_s += time.perf_counter() - t0
        if isinstance(self._error, CollectiveTimeout):
            raise self._error  # already the one line the user should see
        if self._error is not None:
            raise RuntimeError(f"asynchronous collective failed: {self._error}") from self._error
        if self._cuda_event is not None:
            torch.cuda.current_stream().wait_event(self._cuda_event)


class Communicator:
    """Collectives over `group` with the algorithm `algorithm` (ring | rhd | tree | native).

    Ops the chosen algorithm does not implement (see `registry.available`) fall
    back to `fallback` (ring by default), so one name configures a whole run.
    `timeout_s` (None: wait forever) bounds each collective, see the module doc.
    """

    def __init__(self, group=None, *, algorithm: str = "ring", tuning: Tuning | None = None,
                 fallback: str = "ring", timeout_s: float | None = None):
        if algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm must be one of {list(ALGORITHMS)}, got {algorithm!r}")
        if timeout_s is not None and not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0 or None, got {timeout_s!r}")
        self.timeout_s = timeout_s
        self.seq = 0
        """Collectives issued so far; the n-th one is #n in a CollectiveTimeout."""
        self._failed: CollectiveTimeout | None = None
        self.algorithm = algorithm
        self.fallback = fallback
        self.tuning = tuning or Tuning()
        self.stats = CommStats()
        self.transport = Transport(group, self.stats)
        self._queue: queue.SimpleQueue | None = None
        self._thread: threading.Thread | None = None
        self._inflight: list[Handle] = []
        self._stream = None

    @property
    def rank(self) -> int:
        return self.transport.rank

    @property
    def world_size(self) -> int:
        return self.transport.size

    @property
    def group(self):
        return self.transport.group

    def algorithm_for(self, op: str) -> str:
        from .registry import available
        return self.algorithm if self.algorithm in available(op) else self.fallback

    # -- the ops ---------------------------------------------------------
    def all_reduce(self, tensor, *, op="sum", async_op=False):
        plan = api.plan_all_reduce(self.transport, tensor, op=op,
                                   algorithm=self.algorithm_for("all_reduce"), tuning=self.tuning)
        return self._run("all_reduce", plan, async_op, tensor)

    def reduce_scatter(self, output, input, *, op="sum", async_op=False):
        plan = api.plan_reduce_scatter(self.transport, output, input, op=op,
                                       algorithm=self.algorithm_for("reduce_scatter"), tuning=self.tuning)
        return self._run("reduce_scatter", plan, async_op, input)

    def all_gather(self, output, input, *, async_op=False):
        plan = api.plan_all_gather(self.transport, output, input,
                                   algorithm=self.algorithm_for("all_gather"), tuning=self.tuning)
        return self._run("all_gather", plan, async_op, input)

    def all_to_all(self, output, input, *, output_split_sizes=None, input_split_sizes=None, async_op=False):
        plan = api.plan_all_to_all(self.transport, output, input, output_split_sizes=output_split_sizes,
                                   input_split_sizes=input_split_sizes,
                                   algorithm=self.algorithm_for("all_to_all"), tuning=self.tuning)
        return self._run("all_to_all", plan, async_op, input)

    def broadcast(self, tensor, src: int, *, async_op=False):
        plan = api.plan_broadcast(self.transport, tensor, src,
                                  algorithm=self.algorithm_for("broadcast"), tuning=self.tuning)
        return self._run("broadcast", plan, async_op, tensor)

    # -- running ---------------------------------------------------------
    def _run(self, op: str, plan, async_op: bool, tensor: torch.Tensor):
        self.stats.calls += 1
        if self._failed is not None:  # its connections are closed: every later call would fail too
            raise self._failed
        self.seq += 1
        if self.timeout_s is not None:
            plan = self._guarded(op, self.seq, plan)
        if async_op:
            return self._submit(plan, tensor.device)
        self.drain()
        t0 = time.perf_counter()
        plan()
        self.stats.wait_s += time.perf_counter() - t0
        return None

    def _guarded(self, op: str, seq: int, plan):
        """`plan` with a deadline; a peer that stops answering becomes a CollectiveTimeout."""
        def run():
            if self._failed is not None:  # queued behind the collective that failed
                raise self._failed
            started = time.monotonic()
            self.transport.deadline = started + self.timeout_s
            try:
                plan()
            except PeerFailure as failure:
                self._failed = diagnose(failure, op=op, algorithm=self.algorithm_for(op), seq=seq,
                                        group_ranks=self.transport.global_ranks, started=started,
                                        timeout_s=self.timeout_s)
                raise self._failed from None
            finally:
                self.transport.deadline = None
        return run

    def drain(self) -> None:
        """Waits for every queued asynchronous collective (keeps message order across ranks)."""
        while self._inflight:
            self._inflight.pop(0).wait()

    def _submit(self, plan, device: torch.device) -> Handle:
        if self._thread is None:
            self._queue = queue.SimpleQueue()
            self._thread = threading.Thread(target=self._serve, name="ringtrain-comm", daemon=True)
            self._thread.start()
        ready = None
        if device.type == "cuda":
            if self._stream is None:
                self._stream = torch.cuda.Stream(device=device)
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(device))
        handle = Handle(self.stats)
        self._inflight = [h for h in self._inflight if not h.is_completed()] + [handle]
        self._queue.put((plan, handle, device, ready))
        return handle

    def _serve(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            plan, handle, device, ready = item
            try:
                if ready is None:
                    plan()
                    handle._finish(None)
                else:
                    torch.cuda.set_device(device)
                    with torch.cuda.stream(self._stream):
                        self._stream.wait_event(ready)
                        plan()
                        done = torch.cuda.Event()
                        done.record(self._stream)
                    handle._finish(None, done)
            except BaseException as exc:  # handed to the waiter, never lost
                handle._finish(exc)

    def close(self) -> None:
        """Waits for queued work and stops the background thread."""
        self.drain()
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
