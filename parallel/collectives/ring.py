"""Ring collectives: reduce-scatter, all-gather, all-reduce = RS + AG, broadcast.

Rank r sends to r+1 and receives from r-1. The buffer is cut into p pieces and
every piece into segments; segments flow through a window (`pipeline.py`) so
that while one received segment is being reduced the next ones are on the wire,
and a reduced segment is forwarded at once rather than after its whole step.

Cost (alpha-beta, n bytes): all-reduce 2(p-1) alpha + 2(p-1)/p n beta,
reduce-scatter and all-gather (p-1) alpha + (p-1)/p n beta - bandwidth-optimal.

Precision: partial sums travel in the tensor's dtype; for float16/bfloat16 each
hop's add is computed in float32 and rounded once (p-1 roundings in all).
"""

from __future__ import annotations

import torch

from .pipeline import run_window, segment_count
from .reduce_ops import combine_, combine_into, finish_, split_bounds
from .registry import register
from .transport import Transport


def _segmentation(bounds: list[int], elem_size: int, tuning) -> tuple[int, list[list[int]]]:
    """One segment count for all pieces; segment j of piece c is segs[c][j:j+2]."""
    p = len(bounds) - 1
    lengths = [bounds[c + 1] - bounds[c] for c in range(p)]
    nseg = segment_count(max(max(lengths), 1), elem_size, tuning)
    return nseg, [split_bounds(n, nseg) for n in lengths]


def ring_reduce_scatter_pieces(tp: Transport, src: torch.Tensor, bounds: list[int], op: str,
                               tuning, out: torch.Tensor | None = None) -> torch.Tensor:
    """Reduces piece r of `src` across the ring; returns the view holding it.

    In place (out None): partial sums accumulate in `src` itself and piece r
    of src ends fully reduced. Out of place: src is only read; partial sums go
    to two alternating scratch pieces and the last step writes `out`.
    """
    p, r = tp.size, tp.rank
    piece = lambda t, c: t[bounds[c]:bounds[c + 1]]  # noqa: E731
    if p == 1:
        if out is None:
            return piece(src, 0)
        out.copy_(piece(src, 0))
        return out
    send_c = [(r - s - 1) % p for s in range(p - 1)]
    recv_c = [(r - s - 2) % p for s in range(p - 1)]
    nseg, segs = _segmentation(bounds, src.element_size(), tuning)
    if out is None:
        acc = [piece(src, recv_c[s]) for s in range(p - 1)]
    else:
        longest = max(bounds[c + 1] - bounds[c] for c in range(p))
        scratch = [src.new_empty(longest) for _ in range(min(2, p - 2))]
        acc = [scratch[s % 2][: bounds[recv_c[s] + 1] - bounds[recv_c[s]]] for s in range(p - 2)] + [out]
    # step 0 sends this rank's own contribution; step s > 0 forwards what step s-1 reduced
    sources = [piece(src, send_c[0])] + acc[:-1]
    window = min(tuning.window, nseg)
    stage_len = max(segs[c][1] - segs[c][0] for c in range(p))
    staging = [src.new_empty(stage_len) for _ in range(window)]
    nxt, prv = (r + 1) % p, (r - 1) % p

    def post(k):
        s, j = divmod(k, nseg)
        a, b = segs[send_c[s]][j:j + 2]
        c, d = segs[recv_c[s]][j:j + 2]
        return tp.post([(sources[s][a:b], nxt)], [(staging[k % window][: d - c], prv)])

    def finish(k):
        s, j = divmod(k, nseg)
        c, d = segs[recv_c[s]][j:j + 2]
        mine = piece(src, recv_c[s])[c:d]
        combine_into(acc[s][c:d], mine, staging[k % window][: d - c], op)

    run_window((p - 1) * nseg, window, post, finish)
    return acc[-1]


def ring_all_gather_pieces(tp: Transport, buf: torch.Tensor, bounds: list[int], tuning) -> None:
    """In place: piece r of `buf` is this rank's; afterwards every piece is filled."""
    p, r = tp.size, tp.rank
    if p == 1:
        return
    nseg, segs = _segmentation(bounds, buf.element_size(), tuning)
    window = min(tuning.window, nseg)
    nxt, prv = (r + 1) % p, (r - 1) % p

    def post(k):
        s, j = divmod(k, nseg)
        cs, cr = (r - s) % p, (r - s - 1) % p
        a, b = segs[cs][j:j + 2]
        c, d = segs[cr][j:j + 2]
        return tp.post([(buf[bounds[cs] + a: bounds[cs] + b], nxt)],
                       [(buf[bounds[cr] + c: bounds[cr] + d], prv)])

    run_window((p - 1) * nseg, window, post, None)


@register("all_reduce", "ring")
def ring_all_reduce(tp: Transport, flat: torch.Tensor, op: str, tuning) -> None:
    """Reduce-scatter then all-gather as one stream of segments.

    The all-gather of segment j starts as soon as segment j of this rank's
    piece is final, so the pipeline does not drain between the two phases.
    """
    p, r = tp.size, tp.rank
    if p == 1:
        return
    bounds = split_bounds(flat.numel(), p)
    nseg, segs = _segmentation(bounds, flat.element_size(), tuning)
    window = min(tuning.window, nseg)
    stage_len = max(segs[c][1] - segs[c][0] for c in range(p))
    staging = [flat.new_empty(stage_len) for _ in range(window)]
    nxt, prv = (r + 1) % p, (r - 1) % p
    rs_units = (p - 1) * nseg

    def seg(c, j):
        a, b = segs[c][j:j + 2]
        return flat[bounds[c] + a: bounds[c] + b]

    def post(k):
        if k < rs_units:  # reduce-scatter: send piece r-s-1, receive piece r-s-2 into staging
            s, j = divmod(k, nseg)
            incoming = seg((r - s - 2) % p, j)
            return tp.post([(seg((r - s - 1) % p, j), nxt)],
                           [(staging[k % window][: incoming.numel()], prv)])
        s, j = divmod(k - rs_units, nseg)  # all-gather: forward piece r-s, land piece r-s-1 in place
        return tp.post([(seg((r - s) % p, j), nxt)], [(seg((r - s - 1) % p, j), prv)])

    def finish(k):
        if k >= rs_units:
            return
        s, j = divmod(k, nseg)
        target = seg((r - s - 2) % p, j)
        combine_(target, staging[k % window][: target.numel()], op)
        if s == p - 2:
            finish_(target, op, p)  # this segment of piece r is final: average it before it travels

    run_window(2 * rs_units, window, post, finish)


@register("reduce_scatter", "ring")
def ring_reduce_scatter(tp: Transport, out: torch.Tensor, inp: torch.Tensor, op: str, tuning) -> None:
    bounds = split_bounds(inp.numel(), tp.size)
    ring_reduce_scatter_pieces(tp, inp, bounds, op, tuning, out=out)
    finish_(out, op, tp.size)


@register("all_gather", "ring")
def ring_all_gather(tp: Transport, out: torch.Tensor, inp: torch.Tensor, tuning) -> None:
    bounds = split_bounds(out.numel(), tp.size)
    out[bounds[tp.rank]:bounds[tp.rank + 1]].copy_(inp)
    ring_all_gather_pieces(tp, out, bounds, tuning)


@register("broadcast", "ring")
def ring_broadcast(tp: Transport, flat: torch.Tensor, src: int, tuning) -> None:
    """A pipelined chain src -> src+1 -> ...: each segment is forwarded as soon as it lands."""
    p = tp.size
    if p == 1 or flat.numel() == 0:
        return
    v = (tp.rank - src) % p
    prv, nxt = (tp.rank - 1) % p, (tp.rank + 1) % p
    nseg = segment_count(flat.numel(), flat.element_size(), tuning)
    sb = split_bounds(flat.numel(), nseg)
    seg = lambda j: flat[sb[j]:sb[j + 1]]  # noqa: E731
    if v == 0:
        run_window(nseg, min(tuning.window, nseg), lambda j: tp.post([(seg(j), nxt)]), None)
    elif v == p - 1:
        run_window(nseg, min(tuning.window, nseg), lambda j: tp.post((), [(seg(j), prv)]), None)
    else:
        # receive j, then forward j while later segments are still arriving
        pending = []
        for k in range(min(tuning.window, nseg)):
            pending.append(tp.post((), [(seg(k), prv)]))
        sends = []
        for j in range(nseg):
            pending[j].wait_recvs()
            sends.append(tp.post([(seg(j), nxt)]))
            if j + tuning.window < nseg:
                pending.append(tp.post((), [(seg(j + tuning.window), prv)]))
        for posted in sends:
            posted.wait()
