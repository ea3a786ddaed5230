"""Context-parallel attention cases run by a WorkerPool (see harness.py): ring and all-gather
attention on cp groups carved out of the pool, against one process attending over the whole
sequence."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.nn import functional as F
from torch.testing import assert_close

from parallel.collectives import Communicator
from parallel.ring_attention import allgather_attention, cp_attention_bytes, ring_attention, zigzag_chunks

B, H, D = 2, 2, 8
_GROUPS: dict[tuple[int, ...], dist.ProcessGroup] = {}


def _my_group(rank: int, groups) -> dist.ProcessGroup | None:
    """The group of `groups` (disjoint rank lists) holding `rank`. Every rank creates every group,
    in the same order (new_group is collective over the world); they are kept for later cases."""
    mine = None
    for ranks in map(tuple, groups):
        if ranks not in _GROUPS:
            _GROUPS[ranks] = dist.new_group(list(ranks))
        if rank in ranks:
            mine = _GROUPS[ranks]
    return mine


def _problem(K: int, Tc: int, dtype: torch.dtype, seed: int):
    """Whole-sequence q, k, v, dout (B, H, 2K Tc, D), the same on every rank."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, 2 * K * Tc, D, generator=g, dtype=torch.float64).to(dtype) for _ in range(4)]


def _reference(q, k, v, dout, scale):
    """Single-process causal attention and its gradients, in float64."""
    q, k, v = (t.double().requires_grad_() for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    return (out.detach(), *torch.autograd.grad(out, (q, k, v), dout.double()))


def _local(t: torch.Tensor, c: int, K: int, Tc: int) -> torch.Tensor:
    return torch.cat([t[:, :, i * Tc:(i + 1) * Tc] for i in zigzag_chunks(c, K)], dim=2)


def _run(method: str, comm: Communicator, q, k, v, dout, scale):
    """(out, dq, dk, dv, forward bytes, backward bytes, forward wait, backward wait) of one method."""
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    comm.stats.reset()
    if method == "ring":
        out = ring_attention(q, k, v, comm.transport, scale=scale)
    else:
        out = allgather_attention(q, k, v, comm, scale=scale)
    fwd, fwd_wait = comm.stats.bytes_sent, comm.stats.wait_s
    grads = torch.autograd.grad(out, (q, k, v), dout)
    return (out.detach(), *grads, fwd, comm.stats.bytes_sent - fwd, fwd_wait, comm.stats.wait_s - fwd_wait)


def matches_single_process(rank: int, world: int, groups, Tc: int, scale: float | None,
                           dtype: str = "float64", atol: float = 1e-12, rtol: float = 1e-10) -> dict | None:
    """Each cp group of `groups` runs ring and all-gather attention on its zigzag chunks; out, dq,
    dk, dv must equal the reference's slices, bytes sent the cp_attention_bytes formula. For low
    precision, returns the worst errors instead (also of plain SDPA in that dtype) for the test."""
    group = _my_group(rank, groups)
    if group is None:
        return None
    comm = Communicator(group, algorithm="ring")
    K, c = comm.world_size, comm.rank
    dt = getattr(torch, dtype)
    full = _problem(K, Tc, dt, seed=100 * K + Tc)
    want = [_local(t, c, K, Tc) for t in _reference(*full, scale)]
    q, k, v, dout = (_local(t, c, K, Tc) for t in full)
    report = {"K": K, "c": c, "err": {}}
    for method in ("ring", "allgather"):
        out, dq, dk, dv, fwd, bwd, fwd_wait, bwd_wait = _run(method, comm, q, k, v, dout, scale)
        assert out.dtype == dq.dtype == dk.dtype == dv.dtype == dt
        assert (fwd, bwd) == cp_attention_bytes(method, q.shape, dt, K), (method, fwd, bwd)
        if K > 1 or method == "ring":  # a Communicator call counts its run time even alone
            assert (fwd_wait > 0 and bwd_wait > 0) == (K > 1), (method, fwd_wait, bwd_wait)
        got = (out, dq, dk, dv)
        report["err"][method] = [(g.double() - w).abs().max().item() for g, w in zip(got, want)]
        for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
            assert_close(g.double(), w, atol=atol, rtol=rtol, msg=lambda m, name=name: f"{method} {name}: {m}")
    if dt != torch.float64:  # the same problem through plain SDPA in this dtype: the bar to meet
        fq, fk, fv = (t.clone().requires_grad_() for t in full[:3])
        fo = F.scaled_dot_product_attention(fq, fk, fv, is_causal=True, scale=scale)
        plain = [_local(t, c, K, Tc) for t in (fo.detach(), *torch.autograd.grad(fo, (fq, fk, fv), full[3]))]
        report["err"]["sdpa"] = [(g.double() - w).abs().max().item() for g, w in zip(plain, want)]
    comm.close()
    return report
