"""Hierarchical (two-level) collectives: fast links inside a node, one slow link out of it.

On N nodes of P ranks, with n bytes per rank:

    all_reduce      intra-node ring reduce-scatter (local rank l keeps piece l, n/P bytes)
                    -> inter-node all-reduce of piece l among the N ranks with local index l
                    -> intra-node ring all-gather
    reduce_scatter  intra-node ring reduce-scatter of a permuted copy in which local rank l's
                    piece is the N output pieces of the ranks with local index l
                    -> inter-node ring reduce-scatter of those N pieces
    all_gather      the reverse: inter-node ring all-gather, intra-node ring all-gather,
                    and the permuted result put back in group-rank order

Why: each node's link carries 2 (N-1)/N n bytes for the all-reduce (P rings of n/P bytes at
once) against a flat ring's 2 (NP-1)/(NP) n, so with 2 x 2 ranks the slow link carries a
third less (the bound of the speed-up, 1.5x); with many ranks per node the inter-node
latency terms drop from 2 (NP-1) to 2 (N-1) steps too.

The inter-node all-reduce uses the bandwidth-optimal ring, or recursive halving-doubling for
pieces under `SMALL_PIECE_BYTES`, where its lg N latency beats the ring's N-1 steps. Ops
without a hierarchical form (all_to_all, broadcast) take the communicator's fallback. On one
node, one rank per node, or a group whose nodes hold different numbers of its ranks there
are no levels (`Transport.levels` is None) and each op is the flat ring.

Precision: as the ring's, one rounding per hop for half types (P-1 inside, N-1 between).
"""

from __future__ import annotations

import torch

from .nodes import LevelGroups, NodeLayout
from .reduce_ops import finish_, split_bounds
from .registry import lookup, register
from .ring import ring_all_gather_pieces, ring_all_reduce, ring_reduce_scatter_pieces
from .transport import CommStats, Transport

SMALL_PIECE_BYTES = 64 << 10
"""Inter-node pieces below this go by recursive halving-doubling, larger ones by ring."""


class Levels:
    """The intra-node and inter-node transports of one group, counting into its stats."""

    def __init__(self, groups: LevelGroups, stats: CommStats):
        self.layout: NodeLayout = groups.layout
        self.intra = Transport(groups.intra, stats)
        self.inter = Transport(groups.inter, stats)
        self.inter.mark_remote([q != self.inter.rank for q in range(self.inter.size)])
        self.nodes, self.per_node = self.layout.nodes, self.layout.ranks_per_node
        # process groups number their ranks in global order, as the layout numbers local indices
        assert self.intra.size == self.per_node and self.inter.size == self.nodes

    def follow(self, tp: Transport) -> None:
        """The running collective's deadline (hang detection) holds for both levels."""
        self.intra.deadline = self.inter.deadline = tp.deadline

    def order(self) -> list[int]:
        """Group ranks by local index, then node: the permuted layout of reduce-scatter / all-gather."""
        return [r for local in range(self.per_node) for r in self.layout.peers(local)]


def _permuted_bounds(lv: Levels, b: list[int]) -> tuple[list[int], list[int], list[int]]:
    """(order, chunk bounds over the local indices, piece bounds inside this rank's chunk)."""
    order = lv.order()
    sizes = [b[r + 1] - b[r] for r in order]
    n = lv.nodes
    chunks = [0]
    for local in range(lv.per_node):
        chunks.append(chunks[-1] + sum(sizes[local * n:(local + 1) * n]))
    mine = sizes[lv.intra.rank * n:(lv.intra.rank + 1) * n]
    inner = [0]
    for s in mine:
        inner.append(inner[-1] + s)
    return order, chunks, inner


@register("all_reduce", "hier")
def hier_all_reduce(tp: Transport, flat: torch.Tensor, op: str, tuning) -> None:
    lv = tp.levels
    if lv is None:
        return ring_all_reduce(tp, flat, op, tuning)
    lv.follow(tp)
    bounds = split_bounds(flat.numel(), lv.per_node)
    piece = ring_reduce_scatter_pieces(lv.intra, flat, bounds, op, tuning)  # (n/P,) summed over the node
    between = "rhd" if piece.numel() * piece.element_size() < SMALL_PIECE_BYTES else "ring"
    lookup("all_reduce", between)(lv.inter, piece, "sum" if op == "avg" else op, tuning)
    ring_all_gather_pieces(lv.intra, flat, bounds, tuning)
    finish_(flat, op, tp.size)  # the same values on every rank, so the same rounding


@register("reduce_scatter", "hier")
def hier_reduce_scatter(tp: Transport, out: torch.Tensor, inp: torch.Tensor, op: str, tuning) -> None:
    lv = tp.levels
    b = split_bounds(inp.numel(), tp.size)
    if lv is None:
        ring_reduce_scatter_pieces(tp, inp, b, op, tuning, out=out)
        finish_(out, op, tp.size)
        return
    lv.follow(tp)
    order, chunks, inner = _permuted_bounds(lv, b)
    perm = torch.cat([inp[b[r]:b[r + 1]] for r in order])  # a copy: the input is only read
    chunk = ring_reduce_scatter_pieces(lv.intra, perm, chunks, op, tuning)  # summed over the node
    ring_reduce_scatter_pieces(lv.inter, chunk, inner, op, tuning, out=out)  # ... and over the nodes
    finish_(out, op, tp.size)


@register("all_gather", "hier")
def hier_all_gather(tp: Transport, out: torch.Tensor, inp: torch.Tensor, tuning) -> None:
    lv = tp.levels
    b = split_bounds(out.numel(), tp.size)
    if lv is None:
        out[b[tp.rank]:b[tp.rank + 1]].copy_(inp)
        ring_all_gather_pieces(tp, out, b, tuning)
        return
    lv.follow(tp)
    order, chunks, inner = _permuted_bounds(lv, b)
    perm = out.new_empty(out.numel())
    chunk = perm[chunks[lv.intra.rank]:chunks[lv.intra.rank + 1]]
    chunk[inner[lv.inter.rank]:inner[lv.inter.rank + 1]].copy_(inp)
    ring_all_gather_pieces(lv.inter, chunk, inner, tuning)  # the pieces of this local index
    ring_all_gather_pieces(lv.intra, perm, chunks, tuning)  # every local index's
    at = 0
    for r in order:
        size = b[r + 1] - b[r]
        out[b[r]:b[r + 1]].copy_(perm[at:at + size])
        at += size
