"""Point-to-point transport that every hand-written collective sends through.

A `Transport` binds one process group: it knows this rank's position in the
group, translates group ranks to the global ranks that torch.distributed wants,
posts sends and receives (on NCCL together with `batch_isend_irecv`, so NCCL
sees one group call and cannot deadlock on ordering; gloo posts them one by
one anyway), skips empty messages, and counts the bytes this rank puts on the wire.

Hang detection (see timeouts.py): while `deadline` is set, every wait gives up
at that time and a failed post or wait raises `PeerFailure` naming the peer.
This needs gloo, whose waits block the host. On NCCL a wait only orders
streams, so it is left alone there and NCCL's watchdog enforces the process
group's timeout instead.
"""

from __future__ import annotations

import datetime
import threading
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .timeouts import PeerFailure


@dataclass
class CommStats:
    """Running totals of one rank's communication, read by metrics."""

    bytes_sent: int = 0
    """Bytes this rank handed to sends (payload only)."""
    inter_node_bytes: int = 0
    """Of those, bytes sent to ranks on other nodes (known once the communicator knows the nodes)."""
    calls: int = 0
    """Collective calls made."""
    wait_s: float = 0.0
    """Seconds the caller spent blocked waiting on collectives."""

    def reset(self) -> None:
        self.bytes_sent = 0
        self.inter_node_bytes = 0
        self.calls = 0
        self.wait_s = 0.0


class Transport:
    """Sends and receives between the ranks of one process group."""

    def __init__(self, group: dist.ProcessGroup | None = None, stats: CommStats | None = None):
        self.group = group if group is not None else dist.group.WORLD
        self.rank = dist.get_rank(self.group)
        self.size = dist.get_world_size(self.group)
        self.global_ranks: list[int] = dist.get_process_group_ranks(self.group)
        self.stats = stats if stats is not None else CommStats()
        self.deadline: float | None = None
        """time.monotonic() by which the running collective must finish; None: wait forever."""
        # gloo posts one message at a time anyway; posting them here tells which peer a failure is for
        self._batch = "nccl" in str(dist.get_backend(self.group)).lower()
        self._remote: list[bool] | None = None
        self.levels = None
        """hier.Levels: the intra-/inter-node transports of this group, where it spans several
        nodes with the same number of ranks on each; None: the hierarchical ops run flat."""

    def mark_remote(self, remote: list[bool]) -> None:
        """remote[q]: group rank q is on another node (its bytes count as inter-node)."""
        self._remote = list(remote)

    def post(self, sends=(), recvs=()) -> Pending:
        """Posts sends [(tensor, dst)] and receives [(tensor, src)], group ranks.

        Returns the posted operations (see Pending). Empty tensors are not sent: sender and
        receiver derive the same sizes, so both sides skip the same messages.
        """
        group = self.group
        sends = [(t, dst) for t, dst in sends if t.numel()]
        for t, dst in sends:
            nbytes = t.numel() * t.element_size()
            self.stats.bytes_sent += nbytes
            if self._remote is not None and self._remote[dst]:
                self.stats.inter_node_bytes += nbytes
        recvs = [(t, self.global_ranks[src]) for t, src in recvs if t.numel()]
        sends = [(t, self.global_ranks[dst]) for t, dst in sends]
        if self._batch:
            if not recvs and not sends:
                return Pending(self, [], [])
            ops = [dist.P2POp(dist.irecv, t, src, group) for t, src in recvs]
            ops += [dist.P2POp(dist.isend, t, dst, group) for t, dst in sends]
            works = dist.batch_isend_irecv(ops)
            n = len(recvs)
            return Pending(self, [(w, None) for w in works[:n]], [(w, None) for w in works[n:]])
        return Pending(self, [(self._start(dist.irecv, t, src, group), src) for t, src in recvs],
                       [(self._start(dist.isend, t, dst, group), dst) for t, dst in sends])

    def _start(self, fn, tensor, peer: int, group):
        try:
            return fn(tensor, peer, group=group)
        except RuntimeError as e:  # gloo refuses to post on a connection that broke
            if self.deadline is None:
                raise
            raise PeerFailure.from_error(e, [peer], self.deadline) from None

    def wait(self, work, peer: int | None) -> None:
        """Waits for `work` (a message to or from global rank `peer`; None: one of
        torch.distributed's own collectives) until the deadline."""
        if self.deadline is None or self._batch:
            work.wait()
            return
        left = self.deadline - time.monotonic()
        try:
            if peer is None:
                _wait_bounded(work, left)
            else:  # a zero timeout would mean "no timeout" to torch
                work.wait(datetime.timedelta(seconds=max(left, 1e-3)))
        except RuntimeError as e:
            raise PeerFailure.from_error(e, None if peer is None else [peer], self.deadline) from None

    def sendrecv(self, send: torch.Tensor, dst: int, recv: torch.Tensor, src: int) -> None:
        """Blocking exchange: send `send` to dst while receiving `recv` from src."""
        wait_all(self.post([(send, dst)], [(recv, src)]))


def _wait_bounded(work, left: float) -> None:
    """work.wait() for at most `left` seconds, for collectives whose wait ignores the timeout
    it is given: gloo's broadcast and reduce-scatter (torch 2.13) only give up at the process
    group's own timeout. The wait runs on a helper thread; if it is still blocked just after
    the deadline, this raises (the collective stays stuck: the caller ends the process)."""
    error: list[BaseException] = []

    def run():
        try:
            work.wait(datetime.timedelta(seconds=max(left, 1e-3)))
        except BaseException as e:  # noqa: BLE001  (re-raised by the caller's thread)
            error.append(e)

    waiter = threading.Thread(target=run, name="ringtrain-wait", daemon=True)
    waiter.start()
    waiter.join(max(left, 0.0) + 0.1)  # a backend that honours the timeout raises first
    if waiter.is_alive():
        raise RuntimeError(f"torch.distributed collective not finished {max(left, 0.0):.1f} s after it was waited on")
    if error:
        raise error[0]


class Pending:
    """Posted receives and sends, each (work, global peer rank); a receive's data is
    usable after `wait_recvs`, a sent buffer may be overwritten after `wait_sends`."""

    __slots__ = ("tp", "recvs", "sends")

    def __init__(self, tp: Transport, recvs, sends):
        self.tp, self.recvs, self.sends = tp, recvs, sends

    def wait_recvs(self) -> None:
        for w, peer in self.recvs:
            self.tp.wait(w, peer)

    def wait_sends(self) -> None:
        for w, peer in self.sends:
            self.tp.wait(w, peer)

    def wait(self) -> None:
        self.wait_recvs()
        self.wait_sends()


def wait_all(pending) -> None:
    pending.wait()
