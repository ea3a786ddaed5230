"""Recursive halving-doubling (Rabenseifner) all-reduce, any world size.

With p' the largest power of two <= p and q = p - p', the first 2q ranks pair
up: each even one hands its vector to its odd neighbour and sits out, leaving
p' ranks. Those run recursive halving (reduce-scatter: exchange half of the
current range with the partner at distance p'/2, p'/4, ... 1 and reduce the
half kept) and then recursive doubling (all-gather, the same partners in
reverse). Finally the odd ranks hand the result back to their even neighbours.

Cost: 2 lg p' alpha + 2 (p'-1)/p' n beta (+ 2 (alpha + n beta) when p is not a
power of two) - bandwidth-optimal with logarithmic latency.
Precision: as the ring, partial sums travel in the tensor's dtype, each add
computed in float32 for half types; lg p' (+1) roundings.
"""

from __future__ import annotations

import torch

from .pipeline import exchange
from .reduce_ops import finish_, split_bounds
from .registry import register
from .transport import Transport


class Fold:
    """Maps the p ranks onto a power-of-two subset (the non-power-of-two fold)."""

    def __init__(self, rank: int, size: int):
        self.pof2 = 1 << (size.bit_length() - 1)
        self.extra = size - self.pof2
        if rank < 2 * self.extra:
            self.vrank = rank // 2 if rank % 2 else -1  # even ranks sit out
        else:
            self.vrank = rank - self.extra
        self.rank = rank

    def real(self, vrank: int) -> int:
        return 2 * vrank + 1 if vrank < self.extra else vrank + self.extra

    @property
    def folds(self) -> bool:
        return self.rank < 2 * self.extra

    def fold_in(self, tp: Transport, flat: torch.Tensor, tuning, op: str | None) -> None:
        """Even ranks of the first 2q send their vector to the odd neighbour, which reduces it."""
        if not self.folds:
            return
        if self.vrank < 0:
            exchange(tp, flat, self.rank + 1, None, 0, tuning)
        else:
            exchange(tp, None, 0, flat, self.rank - 1, tuning, reduce_op=op)

    def fold_out(self, tp: Transport, flat: torch.Tensor, tuning) -> None:
        """The odd ranks hand the finished vector back to the even ranks that sat out."""
        if not self.folds:
            return
        if self.vrank < 0:
            exchange(tp, None, 0, flat, self.rank + 1, tuning)
        else:
            exchange(tp, flat, self.rank - 1, None, 0, tuning)


@register("all_reduce", "rhd")
def rhd_all_reduce(tp: Transport, flat: torch.Tensor, op: str, tuning) -> None:
    if tp.size == 1:
        return
    fold = Fold(tp.rank, tp.size)
    fold.fold_in(tp, flat, tuning, op)
    if fold.vrank >= 0:
        bounds = split_bounds(flat.numel(), fold.pof2)
        span = lambda lo, hi: flat[bounds[lo]:bounds[hi]]  # noqa: E731
        lo, hi, mask = 0, fold.pof2, fold.pof2 >> 1
        rounds = []
        while mask:
            partner = fold.real(fold.vrank ^ mask)
            mid = (lo + hi) // 2
            keep, give = ((mid, hi), (lo, mid)) if fold.vrank & mask else ((lo, mid), (mid, hi))
            exchange(tp, span(*give), partner, span(*keep), partner, tuning, reduce_op=op)
            rounds.append((partner, keep, give))
            lo, hi = keep
            mask >>= 1
        finish_(span(lo, hi), op, tp.size)
        for partner, keep, give in reversed(rounds):
            exchange(tp, span(*keep), partner, span(*give), partner, tuning)
    fold.fold_out(tp, flat, tuning)
