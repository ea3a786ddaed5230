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

Tracing: with `tracer` set (a callable), every collective, once it has run, calls
`tracer(CollectiveSpan)` on the thread that ran it (the background thread for
asynchronous calls), naming op, algorithm, bytes and the caller's `tag`.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass

import torch

from . import api
from .autotune import DTYPE_NAMES, TuningTable
from .hier import Levels
from .nodes import LevelGroups, NodeLayout
from .registry import ALGORITHMS, AUTO, Tuning, available
from .timeouts import CollectiveTimeout, PeerFailure, diagnose
from .transport import CommStats, Transport


@dataclass(frozen=True)
class CollectiveSpan:
    """One collective as it ran: what, how, how big, and when (time.perf_counter seconds)."""

    op: str
    algorithm: str
    nbytes: int
    """Bytes of the tensor the op was called with (a reduce-scatter's input, an all-gather's output piece)."""
    tag: str | None
    """The caller's label, e.g. "bucket 3"."""
    start: float
    end: float
    thread_id: int
    thread_name: str


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
    """Collectives over `group` with the algorithm `algorithm` (ring | rhd | tree | native | hier | auto).

    Ops the chosen algorithm does not implement (see `registry.available`) fall
    back to `fallback` (ring by default), so one name configures a whole run.
    `auto` asks `table` (autotune.TuningTable) per op, dtype and size; without one it
    runs the fallback. `layout` says which of the group's ranks share a node (one node when
    None): it counts inter-node bytes, and with `levels` (the group's intra-/inter-node
    process groups, nodes.build_level_groups) `hier` runs on two levels.
    `timeout_s` (None: wait forever) bounds each collective, see the module doc.
    """

    def __init__(self, group=None, *, algorithm: str = "ring", tuning: Tuning | None = None,
                 fallback: str = "ring", timeout_s: float | None = None, layout: NodeLayout | None = None,
                 levels: LevelGroups | None = None, table: TuningTable | None = None):
        if algorithm not in ALGORITHMS + (AUTO,):
            raise ValueError(f"algorithm must be one of {list(ALGORITHMS + (AUTO,))}, got {algorithm!r}")
        if timeout_s is not None and not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0 or None, got {timeout_s!r}")
        self.timeout_s = timeout_s
        self.seq = 0
        """Collectives issued so far; the n-th one is #n in a CollectiveTimeout."""
        self._failed: CollectiveTimeout | None = None
        self.algorithm = algorithm
        self.fallback = fallback
        self.tuning = tuning or Tuning()
        self.table = table
        self.stats = CommStats()
        self.transport = Transport(group, self.stats)
        self.layout = levels.layout if levels is not None else (layout or NodeLayout.single(self.transport.size))
        if self.layout.world_size != self.transport.size:
            raise ValueError(f"layout is for {self.layout.world_size} ranks, the group has {self.transport.size}")
        if algorithm == "hier" and not self.layout.uniform:
            raise ValueError(f"algorithm 'hier' needs the same number of ranks on every node; "
                             f"this group's layout: {self.layout.describe()}")
        if self.layout.nodes > 1:
            mine = self.layout.node_of[self.transport.rank]
            self.transport.mark_remote([n != mine for n in self.layout.node_of])
        if levels is not None:
            self.transport.levels = Levels(levels, self.stats)
        self._queue: queue.SimpleQueue | None = None
        self._thread: threading.Thread | None = None
        self._inflight: list[Handle] = []
        self._stream = None
        self.tracer = None
        """None, or a callable taking a CollectiveSpan after each collective (see the module doc)."""

    @property
    def rank(self) -> int:
        return self.transport.rank

    @property
    def world_size(self) -> int:
        return self.transport.size

    @property
    def group(self):
        return self.transport.group

    def algorithm_for(self, op: str, nbytes: int = 0, dtype: torch.dtype = torch.float32) -> str:
        """The implementation a call of `op` on `nbytes` bytes of `dtype` runs."""
        name = self.algorithm
        if name == AUTO:
            allowed = [a for a in available(op) if a != "hier" or self.layout.uniform]
            chosen = None
            if self.table is not None:
                chosen = self.table.choose(op, DTYPE_NAMES.get(dtype, "float32"), nbytes, allowed)
            name = chosen or self.fallback
        return name if name in available(op) else self.fallback

    def _pick(self, op: str, tensor: torch.Tensor) -> str:
        return self.algorithm_for(op, tensor.numel() * tensor.element_size(), tensor.dtype)

    # -- the ops ---------------------------------------------------------
    def all_reduce(self, tensor, *, op="sum", async_op=False, tag=None):
        algo = self._pick("all_reduce", tensor)
        plan = api.plan_all_reduce(self.transport, tensor, op=op, algorithm=algo, tuning=self.tuning)
        return self._run("all_reduce", algo, plan, async_op, tensor, tag)

    def reduce_scatter(self, output, input, *, op="sum", async_op=False, tag=None):
        algo = self._pick("reduce_scatter", input)
        plan = api.plan_reduce_scatter(self.transport, output, input, op=op, algorithm=algo, tuning=self.tuning)
        return self._run("reduce_scatter", algo, plan, async_op, input, tag)

    def all_gather(self, output, input, *, async_op=False, tag=None):
        algo = self._pick("all_gather", output)
        plan = api.plan_all_gather(self.transport, output, input, algorithm=algo, tuning=self.tuning)
        return self._run("all_gather", algo, plan, async_op, output, tag)

    def all_to_all(self, output, input, *, output_split_sizes=None, input_split_sizes=None, async_op=False,
                   tag=None):
        algo = self._pick("all_to_all", input)
        plan = api.plan_all_to_all(self.transport, output, input, output_split_sizes=output_split_sizes,
                                   input_split_sizes=input_split_sizes, algorithm=algo, tuning=self.tuning)
        return self._run("all_to_all", algo, plan, async_op, input, tag)

    def broadcast(self, tensor, src: int, *, async_op=False, tag=None):
        algo = self._pick("broadcast", tensor)
        plan = api.plan_broadcast(self.transport, tensor, src, algorithm=algo, tuning=self.tuning)
        return self._run("broadcast", algo, plan, async_op, tensor, tag)

    # -- running ---------------------------------------------------------
    def _run(self, op: str, algo: str, plan, async_op: bool, tensor: torch.Tensor, tag: str | None = None):
        self.stats.calls += 1
        if self._failed is not None:  # its connections are closed: every later call would fail too
            raise self._failed
        self.seq += 1
        if self.timeout_s is not None:
            plan = self._guarded(op, algo, self.seq, plan)
        if self.tracer is not None:
            plan = self._traced(op, algo, tensor, tag, plan)
        if async_op:
            return self._submit(plan, tensor.device)
        self.drain()
        t0 = time.perf_counter()
        plan()
        self.stats.wait_s += time.perf_counter() - t0
        return None

    def _guarded(self, op: str, algo: str, seq: int, plan):
        """`plan` with a deadline; a peer that stops answering becomes a CollectiveTimeout."""
        def run():
            if self._failed is not None:  # queued behind the collective that failed
                raise self._failed
            started = time.monotonic()
            self.transport.deadline = started + self.timeout_s
            try:
                plan()
            except PeerFailure as failure:
                self._failed = diagnose(failure, op=op, algorithm=algo, seq=seq,
                                        group_ranks=self.transport.global_ranks, started=started,
                                        timeout_s=self.timeout_s)
                raise self._failed from None
            finally:
                self.transport.deadline = None
        return run

    def _traced(self, op: str, algorithm: str, tensor: torch.Tensor, tag: str | None, plan):
        tracer = self.tracer
        nbytes = tensor.numel() * tensor.element_size()

        def run():
            start = time.perf_counter()
            try:
                plan()
            finally:
                if tensor.device.type == "cuda":  # the span ends when the stream's work does
                    torch.cuda.current_stream(tensor.device).synchronize()
                me = threading.current_thread()
                tracer(CollectiveSpan(op, algorithm, nbytes, tag, start, time.perf_counter(), me.ident, me.name))
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
