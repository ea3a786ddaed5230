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

Pipelining across levels: a large buffer is cut into chunks of about `tuning.segment_bytes`
(at most `MAX_CHUNKS`) and the levels work on different chunks at once: while chunk c
crosses the slow link (the inter-node step, on a helper thread), the intra-node step of
chunk c+1 runs on the calling thread, so the slow link is idle only for the first and the
last chunk's intra-node steps. Both threads issue their collectives in one fixed order per
level, the same on every rank, and each level is its own process group.

Precision: as the ring's, one rounding per hop for half types (P-1 inside, N-1 between).
"""

from __future__ import annotations

import threading
from typing import Callable

import torch

from .nodes import LevelGroups, NodeLayout
from .reduce_ops import finish_, split_bounds
from .registry import lookup, register
from .ring import (
    ring_all_gather, ring_all_gather_pieces, ring_all_reduce, ring_reduce_scatter, ring_reduce_scatter_pieces,
)
from .transport import CommStats, Transport

SMALL_PIECE_BYTES = 64 << 10
"""Inter-node pieces below this go by recursive halving-doubling, larger ones by ring."""
MAX_CHUNKS = 16
"""Chunks of the cross-level pipeline at most (each costs a few messages of latency per level)."""


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


def chunk_count(nbytes: int, tuning) -> int:
    """Chunks of the cross-level pipeline for a buffer of `nbytes` (1: no pipeline)."""
    return max(1, min(MAX_CHUNKS, nbytes // max(tuning.segment_bytes, 1)))


def pipeline(chunks: int, first: Callable[[int], None], second: Callable[[int], None],
             third: Callable[[int], None] | None = None) -> None:
    """Runs first(c), second(c), third(c) for every chunk, with second(c) on a helper thread
    overlapping first(c+1) and third(c-1) on this one. first and third use one level, second
    the other, so each level still sees its collectives one at a time in a fixed order:
    first(0) first(1) third(0) first(2) third(1) ... on this thread, second(0) second(1) ...
    on the helper. An error on either thread stops both and is raised here."""
    if chunks == 1:
        first(0)
        second(0)
        if third is not None:
            third(0)
        return
    ready = [threading.Event() for _ in range(chunks)]
    passed = [threading.Event() for _ in range(chunks)]
    errors: list[BaseException] = []

    def helper():
        try:
            for c in range(chunks):
                ready[c].wait()
                if errors:
                    return
                second(c)
                passed[c].set()
        except BaseException as e:  # noqa: BLE001  (re-raised on the calling thread)
            errors.append(e)
        finally:
            for ev in passed:
                ev.set()

    worker = threading.Thread(target=helper, name="ringtrain-hier", daemon=True)
    worker.start()
    try:
        first(0)
        ready[0].set()
        for c in range(chunks):
            if c + 1 < chunks:
                first(c + 1)
                ready[c + 1].set()
            passed[c].wait()
            if errors:
                raise errors[0]
            if third is not None:
                third(c)
    except BaseException as e:
        if not errors:
            errors.append(e)
        raise
    finally:
        for ev in ready:  # a helper still waiting for a chunk sees the error and stops
            ev.set()
        worker.join()


@register("all_reduce", "hier")
def hier_all_reduce(tp: Transport, flat: torch.Tensor, op: str, tuning) -> None:
    lv = tp.levels
    if lv is None:
        return ring_all_reduce(tp, flat, op, tuning)
    lv.follow(tp)
    cb = split_bounds(flat.numel(), chunk_count(flat.numel() * flat.element_size(), tuning))
    chunk = lambda c: flat[cb[c]:cb[c + 1]]  # noqa: E731
    bounds = [split_bounds(cb[c + 1] - cb[c], lv.per_node) for c in range(len(cb) - 1)]
    pieces: dict[int, torch.Tensor] = {}
    between_op = "sum" if op == "avg" else op

    def inside_node(c):  # (n/P,) of chunk c, summed over the node
        pieces[c] = ring_reduce_scatter_pieces(lv.intra, chunk(c), bounds[c], op, tuning)

    def between_nodes(c):
        piece = pieces.pop(c)
        name = "rhd" if piece.numel() * piece.element_size() < SMALL_PIECE_BYTES else "ring"
        lookup("all_reduce", name)(lv.inter, piece, between_op, tuning)

    def gather_node(c):
        ring_all_gather_pieces(lv.intra, chunk(c), bounds[c], tuning)

    pipeline(len(cb) - 1, inside_node, between_nodes, gather_node)
    finish_(flat, op, tp.size)  # the same values on every rank, so the same rounding


class _Permuted:
    """Reduce-scatter / all-gather's working layout: every rank's output piece cut into K
    sub-pieces; chunk c holds sub-piece c of every piece, grouped by local index then node
    (`Levels.order`), so within a chunk local rank l's intra-node piece is the N sub-pieces
    of its inter-node group."""

    def __init__(self, lv: Levels, b: list[int], chunks: int):
        self.order = lv.order()
        n = lv.nodes
        self.sub = {r: split_bounds(b[r + 1] - b[r], chunks) for r in self.order}
        self.slices = []     # per chunk: (start, end) in the group-rank layout, in working order
        self.chunk_at = [0]  # chunk c is work[chunk_at[c]:chunk_at[c + 1]]
        self.intra = []      # per chunk: bounds of the local indices' pieces within the chunk
        self.inner = []      # per chunk: bounds of this rank's inter-node group's sub-pieces in its intra piece
        me = lv.intra.rank
        for c in range(chunks):
            sizes = [self.sub[r][c + 1] - self.sub[r][c] for r in self.order]
            self.slices.append([(b[r] + self.sub[r][c], b[r] + self.sub[r][c + 1]) for r in self.order])
            self.chunk_at.append(self.chunk_at[-1] + sum(sizes))
            intra = [0]
            for local in range(lv.per_node):
                intra.append(intra[-1] + sum(sizes[local * n:(local + 1) * n]))
            self.intra.append(intra)
            inner = [0]
            for s in sizes[me * n:(me + 1) * n]:
                inner.append(inner[-1] + s)
            self.inner.append(inner)

    def gather(self, full: torch.Tensor) -> torch.Tensor:
        """The working copy of a group-rank-ordered buffer."""
        return torch.cat([full[a:z] for per_chunk in self.slices for a, z in per_chunk])

    def scatter(self, work: torch.Tensor, full: torch.Tensor) -> None:
        """The working copy written back in group-rank order."""
        at = 0
        for per_chunk in self.slices:
            for a, z in per_chunk:
                full[a:z].copy_(work[at:at + z - a])
                at += z - a


@register("reduce_scatter", "hier")
def hier_reduce_scatter(tp: Transport, out: torch.Tensor, inp: torch.Tensor, op: str, tuning) -> None:
    lv = tp.levels
    if lv is None:
        return ring_reduce_scatter(tp, out, inp, op, tuning)
    lv.follow(tp)
    b = split_bounds(inp.numel(), tp.size)
    perm = _Permuted(lv, b, chunk_count(inp.numel() * inp.element_size(), tuning))
    work = perm.gather(inp)  # a copy: the input is only read
    mine = perm.sub[tp.rank]
    pieces: dict[int, torch.Tensor] = {}

    def inside_node(c):  # this local index's sub-pieces of chunk c, summed over the node
        chunk = work[perm.chunk_at[c]:perm.chunk_at[c + 1]]
        pieces[c] = ring_reduce_scatter_pieces(lv.intra, chunk, perm.intra[c], op, tuning)

    def between_nodes(c):  # ... and over the nodes, into this rank's sub-piece c of the output
        ring_reduce_scatter_pieces(lv.inter, pieces.pop(c), perm.inner[c], op, tuning,
                                   out=out[mine[c]:mine[c + 1]])

    pipeline(len(perm.slices), inside_node, between_nodes)
    finish_(out, op, tp.size)


@register("all_gather", "hier")
def hier_all_gather(tp: Transport, out: torch.Tensor, inp: torch.Tensor, tuning) -> None:
    lv = tp.levels
    if lv is None:
        return ring_all_gather(tp, out, inp, tuning)
    lv.follow(tp)
    b = split_bounds(out.numel(), tp.size)
    perm = _Permuted(lv, b, chunk_count(out.numel() * out.element_size(), tuning))
    work = out.new_empty(out.numel())
    mine, me, node = perm.sub[tp.rank], lv.intra.rank, lv.inter.rank

    def local_piece(c):
        chunk = work[perm.chunk_at[c]:perm.chunk_at[c + 1]]
        return chunk[perm.intra[c][me]:perm.intra[c][me + 1]]

    def between_nodes(c):  # the sub-pieces c of this local index's ranks on every node
        piece = local_piece(c)
        piece[perm.inner[c][node]:perm.inner[c][node + 1]].copy_(inp[mine[c]:mine[c + 1]])
        ring_all_gather_pieces(lv.inter, piece, perm.inner[c], tuning)

    def inside_node(c):  # ... and of every local index
        ring_all_gather_pieces(lv.intra, work[perm.chunk_at[c]:perm.chunk_at[c + 1]], perm.intra[c], tuning)

    pipeline(len(perm.slices), between_nodes, inside_node)
    perm.scatter(work, out)
