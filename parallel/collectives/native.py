"""`native`: torch.distributed's own collectives, the baseline every algorithm is measured against.

Uneven pieces (numel not divisible by the world size) are padded to equal
pieces, since the backends' tensor collectives need equal pieces.
Precision is the backend's: gloo and NCCL reduce half types in their dtype.
Every call is issued asynchronously and waited through the transport, so a
Communicator's timeout applies (the peers it waits on are the backend's secret).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .reduce_ops import split_bounds
from .registry import register
from .transport import Transport

_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


def _reduce_op(op: str):
    return dist.ReduceOp.AVG if op == "avg" else _OPS[op]


@register("all_reduce", "native")
def native_all_reduce(tp: Transport, flat, op, tuning) -> None:
    tp.stats.bytes_sent += _ring_bytes(flat, tp.size, 2)
    tp.wait(dist.all_reduce(flat, op=_reduce_op(op), group=tp.group, async_op=True), None)


@register("reduce_scatter", "native")
def native_reduce_scatter(tp: Transport, out, inp, op, tuning) -> None:
    p = tp.size
    tp.stats.bytes_sent += _ring_bytes(inp, p, 1)
    if inp.numel() % p == 0:
        tp.wait(dist.reduce_scatter_tensor(out, inp, op=_reduce_op(op), group=tp.group,
                                          async_op=True), None)
        return
    bounds = split_bounds(inp.numel(), p)
    width = bounds[1] - bounds[0]
    padded = inp.new_zeros(width * p)
    for c in range(p):
        padded[c * width: c * width + bounds[c + 1] - bounds[c]].copy_(inp[bounds[c]:bounds[c + 1]])
    piece = inp.new_empty(width)
    tp.wait(dist.reduce_scatter_tensor(piece, padded, op=_reduce_op(op), group=tp.group,
                                      async_op=True), None)
    out.copy_(piece[: out.numel()])


@register("all_gather", "native")
def native_all_gather(tp: Transport, out, inp, tuning) -> None:
    p = tp.size
    tp.stats.bytes_sent += _ring_bytes(out, p, 1)
    if out.numel() % p == 0:
        tp.wait(dist.all_gather_into_tensor(out, inp, group=tp.group, async_op=True), None)
        return
    bounds = split_bounds(out.numel(), p)
    width = bounds[1] - bounds[0]
    mine = inp.new_zeros(width)
    mine[: inp.numel()].copy_(inp)
    gathered = inp.new_empty(width * p)
    tp.wait(dist.all_gather_into_tensor(gathered, mine, group=tp.group, async_op=True), None)
    for c in range(p):
        out[bounds[c]:bounds[c + 1]].copy_(gathered[c * width: c * width + bounds[c + 1] - bounds[c]])


@register("all_to_all", "native")
def native_all_to_all(tp: Transport, out, inp, out_splits, in_splits, tuning) -> None:
    tp.stats.bytes_sent += (inp.numel() - in_splits[tp.rank]) * inp.element_size()
    tp.wait(dist.all_to_all_single(out, inp, out_splits, in_splits, group=tp.group, async_op=True), None)


@register("broadcast", "native")
def native_broadcast(tp: Transport, flat, src, tuning) -> None:
    if tp.rank == src and tp.size > 1:  # a world of one sends nothing
        tp.stats.bytes_sent += flat.numel() * flat.element_size()
    tp.wait(dist.broadcast(flat, src=dist.get_global_rank(tp.group, src), group=tp.group, async_op=True), None)


def _ring_bytes(t: torch.Tensor, p: int, phases: int) -> int:
    """What a bandwidth-optimal backend sends per rank; the backend does not report it."""
    return phases * (p - 1) * t.numel() * t.element_size() // max(p, 1)
