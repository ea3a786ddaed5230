"""A sliding window of in-flight message segments.

Unit k is posted, later waited on, then finished (for a reduction: combined
into the accumulator). Up to `window` units are in flight, so finishing one
overlaps the transfer of the next ones. Unit k + window is posted only after
unit k finished, which is what lets a ring forward a segment it just reduced.
"""

from __future__ import annotations

from typing import Callable

from .reduce_ops import combine_, split_bounds
from .transport import Pending, Transport


def segment_count(max_elems: int, element_size: int, tuning) -> int:
    """Segments to cut a piece into: about tuning.segment_bytes each, and at least 2
    (so one is reduced while the next travels) once the piece reaches
    2 x tuning.min_split_bytes; smaller pieces travel whole, since a second
    message costs more latency than the overlap buys."""
    nbytes = max_elems * element_size
    want = -(-nbytes // tuning.segment_bytes)
    if nbytes >= 2 * tuning.min_split_bytes:
        want = max(2, want)
    return max(1, min(max_elems, want))


def run_window(n_units: int, window: int, post: Callable[[int], "Pending"],
               finish: Callable[[int], None] | None) -> None:
    """Unit k is finished once its receive landed (its send may still be draining);
    before unit k + window is posted, the sends of units <= k are complete, so a
    later unit may overwrite what an earlier one sent."""
    pending = {}
    for k in range(min(window, n_units)):
        pending[k] = post(k)
    for k in range(n_units):
        pending[k].wait_recvs()
        if finish is not None:
            finish(k)
        pending.pop(k).wait_sends()
        if k + window < n_units:
            pending[k + window] = post(k + window)


def exchange(tp: Transport, send, dst: int, recv, src: int, tuning, reduce_op: str | None = None) -> None:
    """Sends `send` to dst while receiving a message of recv's size from src.

    With reduce_op, the message is combined into `recv` segment by segment
    through a staging buffer; without, it lands in `recv` directly. Either
    side may be None (send only or receive only). Both peers derive the same
    segmentation from the message length, so segments match one to one.
    """
    ns = send.numel() if send is not None else 0
    nr = recv.numel() if recv is not None else 0
    ref = send if send is not None else recv
    nseg = segment_count(max(ns, nr, 1), ref.element_size(), tuning)
    sb, rb = split_bounds(ns, nseg), split_bounds(nr, nseg)
    window = min(tuning.window, nseg)
    staging = None
    if reduce_op is not None and nr:
        staging = [recv.new_empty(rb[1] - rb[0]) for _ in range(window)]

    def post(k):
        sends = [(send[sb[k]:sb[k + 1]], dst)] if ns else []
        recvs = []
        if nr:
            target = recv[rb[k]:rb[k + 1]] if staging is None else staging[k % window][: rb[k + 1] - rb[k]]
            recvs = [(target, src)]
        return tp.post(sends, recvs)

    def finish(k):
        combine_(recv[rb[k]:rb[k + 1]], staging[k % window][: rb[k + 1] - rb[k]], reduce_op)

    run_window(nseg, window, post, finish if staging is not None else None)
