"""Latency-optimised algorithms for small messages.

all_reduce "tree": recursive doubling, a butterfly in which every rank is the
root of its own binomial tree. After the non-power-of-two fold (see rhd.Fold),
lg p' rounds each exchange the whole vector with the partner at distance
1, 2, 4 ... and combine it, so every rank ends with the full result.
Cost: lg p' alpha + lg p' n beta (+ 2 (alpha + n beta) for the fold): the
fewest messages, which wins while alpha dominates (small n).
Precision: float16 / bfloat16 input is widened to float32 for the whole
reduction and rounded once at the end (the vector is small, so the wider
messages cost nothing that matters). Every rank combines the same operands in
mirrored order; IEEE add, max and min commute, so all ranks end bitwise equal.

broadcast "tree": a binomial tree from the source, lg p rounds.
"""

from __future__ import annotations

import torch

from .reduce_ops import HALF_DTYPES, combine_, finish_
from .registry import register
from .rhd import Fold
from .transport import Transport, wait_all


@register("all_reduce", "tree")
def tree_all_reduce(tp: Transport, flat: torch.Tensor, op: str, tuning) -> None:
    if tp.size == 1:
        return
    work = flat.float() if flat.dtype in HALF_DTYPES else flat
    fold = Fold(tp.rank, tp.size)
    fold.fold_in(tp, work, tuning, op)
    if fold.vrank >= 0:
        incoming = torch.empty_like(work)
        mask = 1
        while mask < fold.pof2:
            partner = fold.real(fold.vrank ^ mask)
            tp.sendrecv(work, partner, incoming, partner)
            combine_(work, incoming, op)
            mask <<= 1
        finish_(work, op, tp.size)
    fold.fold_out(tp, work, tuning)
    if work is not flat:
        flat.copy_(work)


@register("broadcast", "tree")
def tree_broadcast(tp: Transport, flat: torch.Tensor, src: int, tuning) -> None:
    p = tp.size
    if p == 1:
        return
    v = (tp.rank - src) % p
    real = lambda vr: (vr + src) % p  # noqa: E731
    mask = 1
    while mask < p:
        if v & mask:
            wait_all(tp.post((), [(flat, real(v - mask))]))
            break
        mask <<= 1
    mask >>= 1
    sends = []
    while mask > 0:
        if v + mask < p:
            sends.append((flat, real(v + mask)))
        mask >>= 1
    wait_all(tp.post(sends))
