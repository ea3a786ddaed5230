"""Point-to-point transport that every hand-written collective sends through.

A `Transport` binds one process group: it knows this rank's position in the
group, translates group ranks to the global ranks that `P2POp` wants, posts
sends and receives together with `batch_isend_irecv` (so NCCL sees one group
call and cannot deadlock on ordering), skips empty messages, and counts the
bytes this rank puts on the wire.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class CommStats:
    """Running totals of one rank's communication, read by metrics."""

    bytes_sent: int = 0
    """Bytes this rank handed to sends (payload only)."""
    calls: int = 0
    """Collective calls made."""
    wait_s: float = 0.0
    """Seconds the caller spent blocked waiting on collectives."""

    def reset(self) -> None:
        self.bytes_sent = 0
        self.calls = 0
        self.wait_s = 0.0


class Transport:
    """Sends and receives between the ranks of one process group."""

    def __init__(self, group: dist.ProcessGroup | None = None, stats: CommStats | None = None,
                 channels: list[dist.ProcessGroup] | None = None):
        self.group = group if group is not None else dist.group.WORLD
        self.rank = dist.get_rank(self.group)
        self.size = dist.get_world_size(self.group)
        self._global = dist.get_process_group_ranks(self.group)
        self.stats = stats if stats is not None else CommStats()
        # Extra groups over the same ranks: each is its own connection (and, on
        # gloo, its own I/O thread), so segments striped over them travel in parallel.
        self.channels = [self.group] + list(channels or [])

    def post(self, sends=(), recvs=(), channel: int = 0) -> Pending:
        """Posts sends [(tensor, dst)] and receives [(tensor, src)], group ranks.

        Returns the posted operations (see Pending). Empty tensors are not sent: sender and
        receiver derive the same sizes, so both sides skip the same messages.
        """
        group = self.channels[channel % len(self.channels)]
        ops = []
        for tensor, src in recvs:
            if tensor.numel():
                ops.append(dist.P2POp(dist.irecv, tensor, self._global[src], group))
        for tensor, dst in sends:
            if tensor.numel():
                ops.append(dist.P2POp(dist.isend, tensor, self._global[dst], group))
                self.stats.bytes_sent += tensor.numel() * tensor.element_size()
        if not ops:
            return Pending([], [])
        works = dist.batch_isend_irecv(ops)
        n_recv = sum(1 for t, _ in recvs if t.numel())
        return Pending(works[:n_recv], works[n_recv:])

    def sendrecv(self, send: torch.Tensor, dst: int, recv: torch.Tensor, src: int) -> None:
        """Blocking exchange: send `send` to dst while receiving `recv` from src."""
        wait_all(self.post([(send, dst)], [(recv, src)]))


class Pending:
    """Posted receives and sends; a receive's data is usable after `wait_recvs`,
    a sent buffer may be overwritten after `wait_sends`."""

    __slots__ = ("recvs", "sends")

    def __init__(self, recvs, sends):
        self.recvs, self.sends = recvs, sends

    def wait_recvs(self) -> None:
        for w in self.recvs:
            w.wait()

    def wait_sends(self) -> None:
        for w in self.sends:
            w.wait()

    def wait(self) -> None:
        self.wait_recvs()
        self.wait_sends()


def wait_all(pending) -> None:
    pending.wait()
