"""Hang diagnosis: a collective whose peers stop taking part fails with one line.

A `Communicator` built with `timeout_s` gives every collective a deadline
(counted from the moment it starts running); the transport waits on each
send/receive only until then (gloo; see `Transport`). A wait that fails names
the peer it was for: the rank this one waits on. That peer may itself be alive
and waiting on a third rank (in a ring only the dead rank's neighbours wait on
it directly), so before raising, the failing rank reports itself in the
job's key-value store (the one `init_process_group` rendezvoused through) and
follows the reports: a rank that reported is alive and stuck, so the chain
goes on to whom it waits on; a rank that has not reported after a grace
period is missing. Every survivor therefore names the same missing rank(s):

    ringtrain: all_reduce #57 (ring, group of 4) timed out after 30.0 s on rank 0: no response from rank(s) [3]
    ringtrain: all_reduce #57 (ring, group of 4) failed after 30.0 s on rank 1: lost connection to rank(s) [0];
               missing rank(s) [3]                                                 (one line, wrapped here)

gloo closes all of a process's connections when one of its waits times out,
so once the first rank gives up its peers fail within milliseconds (as
"failed ... lost connection"), and the ranks that follow the chain find its report.

After the error the process group is unusable and the stuck send/receive
cannot be cancelled: a normal interpreter exit would wait for gloo's own
timeout. Log the line and end the process with `process_group.abort_process`.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import time

import torch.distributed as dist

GRACE_S = 5.0
"""At most this long (and at most timeout_s) a failed rank waits for its peers' reports."""

_LOST = re.compile(r"connection|closed|closure|reset|broken pipe", re.IGNORECASE)


class PeerFailure(RuntimeError):
    """Raised by the transport: a wait on `peers` (global ranks; None: not known) failed."""

    def __init__(self, peers: list[int] | None, timed_out: bool, detail: str):
        super().__init__(detail)
        self.peers, self.timed_out = peers, timed_out

    @staticmethod
    def from_error(error: RuntimeError, peers, deadline: float) -> RuntimeError:
        """The error to raise for a failed wait: a PeerFailure when the peer stopped
        answering (deadline passed or connection lost), else the error itself."""
        if time.monotonic() >= deadline - 0.1:  # torch rounds the wait down to whole milliseconds
            return PeerFailure(peers, True, str(error))
        if _LOST.search(str(error)):
            return PeerFailure(peers, False, str(error))
        return error


class CollectiveTimeout(RuntimeError):
    """A collective could not finish because peers stopped taking part; str() is one line.

    Attributes: op, algorithm, seq (the collective's number on its communicator,
    the same on every rank), group_size, rank (global), elapsed_s, timed_out
    (False: a connection broke before the deadline), waiting_on (global ranks
    this rank waited on, None when torch.distributed's own collective hides
    them) and missing (the ranks at the end of the wait chain, None when the
    store could not be asked).
    """

    def __init__(self, *, op: str, algorithm: str, seq: int, group_size: int, rank: int, elapsed_s: float,
                 timed_out: bool, waiting_on: list[int] | None, missing: list[int] | None):
        self.op, self.algorithm, self.seq, self.group_size, self.rank = op, algorithm, seq, group_size, rank
        self.elapsed_s, self.timed_out, self.waiting_on, self.missing = elapsed_s, timed_out, waiting_on, missing
        super().__init__(self._line())

    def _line(self) -> str:
        head = (f"ringtrain: {self.op} #{self.seq} ({self.algorithm}, group of {self.group_size}) "
                f"{'timed out' if self.timed_out else 'failed'} after {self.elapsed_s:.1f} s "
                f"on rank {self.rank}: ")
        if self.waiting_on is None:  # native: whom it waits on is inside the backend
            if self.missing:
                return head + f"missing rank(s) {self.missing}"
            return head + ("peers unknown (torch.distributed collective)" if self.missing is None
                           else "every other rank is stuck in a collective too (mismatched calls?)")
        what = "no response from" if self.timed_out else "lost connection to"
        line = head + f"{what} rank(s) {self.waiting_on}"
        if self.missing is None or self.missing == self.waiting_on:
            return line
        if self.missing:
            return line + f"; missing rank(s) {self.missing}"
        return line + "; they are stuck in collectives too (mismatched calls?)"


def diagnose(failure: PeerFailure, *, op: str, algorithm: str, seq: int, group_ranks: list[int],
             started: float, timeout_s: float) -> CollectiveTimeout:
    """Reports this rank as stuck, follows the other ranks' reports, returns the error to raise."""
    elapsed = time.monotonic() - started
    me = dist.get_rank()
    candidates = failure.peers if failure.peers is not None else [g for g in group_ranks if g != me]
    missing = None
    grace = min(GRACE_S, timeout_s)
    try:
        store = dist.distributed_c10d._get_default_store()
        store.set_timeout(datetime.timedelta(seconds=grace + 1))  # the process group is done with it
        store.set(_key(me), json.dumps({"op": op, "seq": seq, "waits": failure.peers}))
        missing = _follow(store, candidates, me, grace)
    except Exception:  # noqa: BLE001  (no store, or its host is gone: report what this rank knows)
        pass
    return CollectiveTimeout(op=op, algorithm=algorithm, seq=seq, group_size=len(group_ranks), rank=me,
                             elapsed_s=elapsed, timed_out=failure.timed_out, waiting_on=failure.peers,
                             missing=missing)


def _key(rank: int) -> str:
    # one store may serve several restarts of an elastic job
    return f"ringtrain/stuck/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/{rank}"


def _follow(store, start: list[int], me: int, grace_s: float) -> list[int]:
    """A rank that reported is alive and stuck: go on to whom it waits on. Whoever has
    not reported within grace_s is missing (dead, or stuck outside communication)."""
    frontier, seen = set(start) - {me}, {me}
    deadline = time.monotonic() + grace_s
    while frontier:
        for rank in sorted(frontier):
            if store.check([_key(rank)]):
                frontier.discard(rank)
                seen.add(rank)
                frontier |= set(json.loads(store.get(_key(rank)))["waits"] or []) - seen
        if not frontier or time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    return sorted(frontier)
