"""Attention layers under context parallelism, run by a WorkerPool (see harness.py): each kind on a
cp group carved out of the pool against the same layer run by one process on the whole sequence."""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist

from models.attention import build_attention
from models.config import AttentionConfig
from parallel.collectives import Communicator
from parallel.context_parallel import ContextShard

B, C, HEADS = 2, 16, 2
_GROUPS: dict[tuple[int, ...], dist.ProcessGroup] = {}


def _group(rank: int, K: int) -> dist.ProcessGroup | None:
    """Ranks 0..K-1's group (created once, by every rank of the pool, in the same order)."""
    ranks = tuple(range(K))
    if ranks not in _GROUPS:
        _GROUPS[ranks] = dist.new_group(list(ranks))
    return _GROUPS[ranks] if rank < K else None


def _layer(kind: str, T: int, chunk_size: int, layer_idx: int):
    cfg = AttentionConfig(kind=kind, chunk_size=chunk_size, block_size=chunk_size, nb_features=12, shared_dim=8,
                          redraw_interval=0, diag_layers=1)
    torch.manual_seed(11)
    layer = build_attention(cfg, d_model=C, n_heads=HEADS, seq_len=T, layer_idx=layer_idx, n_layers=2).double()
    with torch.no_grad():  # GAU's scale / offset start at 1 / 0: move them so their gradients mean something
        for p in layer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return layer


def layer_matches_single_process(rank: int, world: int, kind: str, K: int, T: int, chunk_size: int,
                                 layer_idx: int = 0, lengths: tuple[int, ...] = ()) -> dict | None:
    """Output, input gradient and parameter gradients (summed over the cp ranks) of the layer on this
    rank's slice equal the whole-sequence layer's; returns the cp bytes this rank sent per length."""
    group = _group(rank, K)
    if group is None:
        return None
    sent = {}
    for length in (T, *lengths):
        ref = _layer(kind, length, chunk_size, layer_idx)
        layer = copy.deepcopy(ref)  # taken before cp is applied: the reference has no shard
        g = torch.Generator().manual_seed(length)
        x = torch.randn(B, length, C, generator=g, dtype=torch.float64, requires_grad=True)
        dout = torch.randn(B, length, C, generator=g, dtype=torch.float64)
        out_ref = ref(x)
        out_ref.backward(dout)

        comm = Communicator(group)
        shard = ContextShard(comm, layout="balanced" if kind == "softmax" else "contiguous")
        layer.cp = shard
        x_local = shard.local(x.detach()).requires_grad_()
        out = layer(x_local)
        out.backward(shard.local(dout))
        sent[length] = shard.stats.bytes_sent
        grads = [p.grad.clone() for p in layer.parameters()]
        for grad in grads:  # every collective before any assertion: a failing rank must not leave a peer waiting
            dist.all_reduce(grad, group=group)  # each rank's tokens contribute their part
        comm.close()
        # float64 throughout; sums merged in another order than one process's: ~1e-15 relative
        tol = dict(rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(out, shard.local(out_ref.detach()), **tol, msg=lambda m: f"output: {m}")
        torch.testing.assert_close(x_local.grad, shard.local(x.grad), **tol, msg=lambda m: f"input grad: {m}")
        for (name, _), grad, q in zip(layer.named_parameters(), grads, ref.parameters()):
            torch.testing.assert_close(grad, q.grad, **tol, msg=lambda m, name=name: f"grad of {name}: {m}")
    return sent


def performer_far_apart_maxima(rank: int, world: int) -> bool | None:
    """float32 Performer on cp 2 whose first rank's keys have logits far below the second's (beyond
    exp's float32 range apart): the rescaling of earlier states must not overflow, and the output
    still equals the one-process layer's within float32 rounding."""
    group = _group(rank, 2)
    if group is None:
        return None
    ref = _layer("performer", 16, 4, 0).float()
    layer = copy.deepcopy(ref)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(B, 16, C, generator=g)
    x[:, :8] *= 60.0  # the first rank's keys: logits hundreds below the second's (the -|k|^2 / 2 term)
    out_ref = ref(x)
    comm = Communicator(group)
    shard = ContextShard(comm, layout="contiguous")
    layer.cp = shard
    out = layer(shard.local(x))
    comm.close()
    assert torch.isfinite(out_ref).all() and torch.isfinite(out).all(), "not finite"
    torch.testing.assert_close(out, shard.local(out_ref.detach()), rtol=1e-4, atol=1e-5)
    return True
