"""Causal softmax attention over a sequence split across the K ranks of a cp group.

Layout ("balanced", see context_parallel.py): T tokens are cut into 2K chunks of Tc = T / (2K);
cp rank c holds chunks c and 2K-1-c, in that order, so q, k, v are (B, H, 2Tc, D) on every rank.
An early chunk paired with a late one gives every rank the same causal work.

Two methods with the same results:

    ring       the K/V of both chunks (one packed tensor) travel round the ring c -> c+1,
               the next block in flight while this one is computed; partial outputs are merged
               by their log-sum-exp. Backward sends K/V round again with a dK/dV accumulator
               that every rank adds to; after K hops it is back at its owner. Memory O(T/K).
    allgather  all-gather K/V once (torchtitan's way), attend locally, reduce-scatter dK/dV.
               Memory O(T) per rank for K/V: the baseline to compare against.

Which (query chunk a, key chunk b) pairs are computed: b < a whole, b == a causal, b > a never.
At ring step s rank c holds the K/V of rank r = (c - s) mod K, chunks r and 2K-1-r:

    r == c   (c, c) causal, (2K-1-c, c) whole, (2K-1-c, 2K-1-c) causal
    r < c    both query chunks against key chunk r; chunk 2K-1-r is later than both
    r > c    query chunk 2K-1-c against both key chunks; query chunk c precedes both
so every step after the first does exactly two whole chunk-pairs, as one non-causal call.

Backward (the FlashAttention trick): a block's gradients depend on the softmax only through
P = exp(S - lse) and delta = rowsum(dO * O). Computed with the final merged O and lse these are
the global softmax's, so the per-block gradients simply add up to the exact ones.

Merging and gradient accumulation run in float64 for float64 inputs, float32 otherwise.
"""

from __future__ import annotations

import math
import time

import torch

from .collectives import Communicator
from .collectives.transport import Pending, Transport

_FLASH_CPU_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype outputs are merged and gradients accumulated in."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def zigzag_chunks(cp_rank: int, cp_size: int) -> tuple[int, int]:
    """The two global chunk indices (of 2 cp_size) that cp rank `cp_rank` holds, in its order."""
    if not 0 <= cp_rank < cp_size:
        raise ValueError(f"cp_rank must be in [0, {cp_size}), got {cp_rank}")
    return cp_rank, 2 * cp_size - 1 - cp_rank


def cp_attention_bytes(method: str, shape, dtype: torch.dtype, cp_size: int) -> tuple[int, int]:
    """(forward, backward) bytes one rank sends per attention layer; `shape` is the local q's
    (B, H, 2Tc, D). With N = B*H*2Tc*D, b = dtype's element size, b_acc = acc_dtype's:

        ring       forward (K-1) * 2N * b              (K/V, K-1 hops)
                   backward (K-1) * 2N * b + K * 2N * b_acc   (K/V again, the dK/dV accumulator
                                                        K hops); 0 when K = 1
        allgather  forward (K-1) * 2N * b              (all-gather of K/V)
                   backward (K-1) * 2N * b_acc         (reduce-scatter of dK/dV)

    allgather's assume a bandwidth-optimal all-gather and reduce-scatter (ring, rhd, native),
    each rank sending (K-1)/K of the K-piece buffer."""
    K = cp_size
    n = 2 * math.prod(shape)                          # K and V of this rank
    b, b_acc = torch.empty((), dtype=dtype).element_size(), torch.empty((), dtype=acc_dtype(dtype)).element_size()
    if method == "ring":
        return (K - 1) * n * b, ((K - 1) * n * b + K * n * b_acc) if K > 1 else 0
    if method == "allgather":
        return (K - 1) * n * b, (K - 1) * n * b_acc
    raise ValueError(f"method must be 'ring' or 'allgather', got {method!r}")


# -- one block -------------------------------------------------------------------------------

def _use_flash(q: torch.Tensor) -> bool:
    return q.device.type == "cpu" and q.dtype in _FLASH_CPU_DTYPES


def _scores(q, k, causal: bool, scale: float) -> torch.Tensor:
    """(B, H, Tq, Tk) scaled scores in the accumulation dtype, -inf above the diagonal if causal."""
    acc = acc_dtype(q.dtype)
    s = (q.to(acc) @ k.to(acc).transpose(-2, -1)) * scale
    if causal:  # top-left aligned: query i sees keys <= i
        hide = torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).triu(1)
        s = s.masked_fill(hide, float("-inf"))
    return s


def _check_block(q, k, causal: bool) -> None:
    if causal and q.shape[-2] != k.shape[-2]:
        raise ValueError(f"a causal block needs as many queries as keys, got {q.shape[-2]} and {k.shape[-2]}")


def block_attention(q, k, v, *, causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of q (B, H, Tq, D) over k, v (B, H, Tk, D) -> out (B, H, Tq, D) in q's
    dtype, lse (B, H, Tq) in acc_dtype. causal: Tq == Tk, query i sees keys <= i."""
    _check_block(q, k, causal)
    if _use_flash(q):
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
    s = _scores(q, k, causal, scale)
    lse = torch.logsumexp(s, dim=-1)                                        # (B, H, Tq)
    out = torch.exp(s - lse.unsqueeze(-1)) @ v.to(s.dtype)                  # (B, H, Tq, D)
    return out.to(q.dtype), lse


def block_attention_backward(dout, q, k, v, out, lse, *, causal: bool, scale: float):
    """(dq, dk, dv) in q's dtype of one block. `out` (q's dtype) and `lse` may be the final merged
    ones over every key: then the block's share of the exact gradients comes back (module doc)."""
    _check_block(q, k, causal)
    if _use_flash(q):
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, k, v, out, lse, 0.0, causal, scale=scale)
    s = _scores(q, k, causal, scale)
    p = torch.exp(s - lse.to(s.dtype).unsqueeze(-1))                        # (B, H, Tq, Tk)
    do = dout.to(s.dtype)
    dv = p.transpose(-2, -1) @ do
    delta = (do * out.to(s.dtype)).sum(-1, keepdim=True)                    # (B, H, Tq, 1)
    ds = p * (do @ v.to(s.dtype).transpose(-2, -1) - delta) * scale
    dq, dk = ds @ k.to(s.dtype), ds.transpose(-2, -1) @ q.to(s.dtype)
    return dq.to(q.dtype), dk.to(q.dtype), dv.to(q.dtype)


def _merge(out, lse, part, part_lse) -> None:
    """In place: (out, lse) over some keys (acc dtype) absorb a partial result over other keys."""
    new = torch.logaddexp(lse, part_lse)
    out.mul_(torch.exp(lse - new).unsqueeze(-1)).add_(part.to(out.dtype) * torch.exp(part_lse - new).unsqueeze(-1))
    lse.copy_(new)


# -- ring ------------------------------------------------------------------------------------

def _pairs(c: int, r: int, n: int) -> list[tuple[slice, slice, bool]]:
    """(local query rows, local key rows of rank r, causal) that rank c computes against rank r's K/V."""
    early, late, both = slice(0, n), slice(n, 2 * n), slice(0, 2 * n)
    if r == c:
        return [(early, early, True), (late, early, False), (late, late, True)]
    if r < c:
        return [(both, early, False)]
    return [(late, both, False)]


def _wait(tp: Transport, pending: Pending) -> None:
    t0 = time.perf_counter()
    pending.wait()
    tp.stats.wait_s += time.perf_counter() - t0


def _check_qkv(q, k, v) -> int:
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must be (B, H, 2Tc, D) of one shape, got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[2] % 2:
        raise ValueError(f"each cp rank holds two equal chunks, got {q.shape[2]} local tokens")
    return q.shape[2] // 2


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, tp: Transport, scale: float):
        n, K, c = _check_qkv(q, k, v), tp.size, tp.rank
        acc = acc_dtype(q.dtype)
        out = torch.zeros(q.shape, dtype=acc, device=q.device)                 # (B, H, 2Tc, D)
        lse = torch.full(q.shape[:-1], float("-inf"), dtype=acc, device=q.device)  # (B, H, 2Tc)
        kv = torch.stack((k, v))                                                # (2, B, H, 2Tc, D)
        spare = torch.empty_like(kv) if K > 1 else None
        for s in range(K):
            r = (c - s) % K
            pending = tp.post([(kv, (c + 1) % K)], [(spare, (c - 1) % K)]) if s < K - 1 else None
            for rows, cols, causal in _pairs(c, r, n):
                part, part_lse = block_attention(q[:, :, rows], kv[0][:, :, cols], kv[1][:, :, cols],
                                                 causal=causal, scale=scale)
                _merge(out[:, :, rows], lse[:, :, rows], part, part_lse)
            if pending is not None:
                _wait(tp, pending)
                kv, spare = spare, kv
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.tp, ctx.scale = tp, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        tp, scale = ctx.tp, ctx.scale
        n, K, c = q.shape[2] // 2, tp.size, tp.rank
        dout = dout.to(q.dtype).contiguous()
        acc = acc_dtype(q.dtype)
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        kv = torch.stack((k, v))                                                # (2, B, H, 2Tc, D)
        kv_spare = torch.empty_like(kv) if K > 1 else None
        dkv = torch.zeros(kv.shape, dtype=acc, device=q.device)                 # travelling dK/dV
        dkv_spare = torch.empty_like(dkv) if K > 1 else None
        grads = None     # the accumulator posted last step: its send, and the next block's receive
        for s in range(K):
            r = (c - s) % K
            kv_pending = tp.post([(kv, (c + 1) % K)], [(kv_spare, (c - 1) % K)]) if s < K - 1 else None
            mine = []
            for rows, cols, causal in _pairs(c, r, n):
                gq, gk, gv = block_attention_backward(dout[:, :, rows], q[:, :, rows], kv[0][:, :, cols],
                                                      kv[1][:, :, cols], out[:, :, rows], lse[:, :, rows],
                                                      causal=causal, scale=scale)
                dq[:, :, rows] += gq
                mine.append((cols, gk, gv))
            if grads is not None:  # block r's accumulator has arrived; the one sent before is free
                _wait(tp, grads)
                dkv, dkv_spare = dkv_spare, dkv
            for cols, gk, gv in mine:
                dkv[0][:, :, cols] += gk
                dkv[1][:, :, cols] += gv
            if K > 1:  # on to c+1; after the last step what arrives is this rank's own, complete
                grads = tp.post([(dkv, (c + 1) % K)], [(dkv_spare, (c - 1) % K)])
            if kv_pending is not None:
                _wait(tp, kv_pending)
                kv, kv_spare = kv_spare, kv
        if grads is not None:
            _wait(tp, grads)
            dkv = dkv_spare
        return dq.to(q.dtype), dkv[0].to(q.dtype), dkv[1].to(q.dtype), None, None


def ring_attention(q, k, v, transport: Transport, *, scale: float | None = None) -> torch.Tensor:
    """Causal attention of this rank's queries over the whole sequence; q, k, v (B, H, 2Tc, D) in
    the balanced layout of `transport`'s group (rank = cp rank) -> (B, H, 2Tc, D), q's dtype.
    Bytes go to transport.stats.bytes_sent, seconds blocked to transport.stats.wait_s."""
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return _RingAttention.apply(q, k, v, transport, scale)


# -- all-gather ------------------------------------------------------------------------------

def _to_global(pieces: torch.Tensor, n: int) -> torch.Tensor:
    """(K, 2, B, H, 2n, D) pieces in rank order (rank r: chunks r, 2K-1-r) -> (2, B, H, 2Kn, D)."""
    K, two, B, H, _, D = pieces.shape
    halves = pieces.view(K, two, B, H, 2, n, D)
    chunks = torch.cat((halves[:, :, :, :, 0], halves[:, :, :, :, 1].flip(0)))  # (2K, 2, B, H, n, D)
    return chunks.permute(1, 2, 3, 0, 4, 5).reshape(two, B, H, 2 * K * n, D)


def _to_pieces(full: torch.Tensor, K: int, n: int) -> torch.Tensor:
    """The inverse of _to_global, contiguous: (2, B, H, 2Kn, D) -> (K, 2, B, H, 2n, D)."""
    two, B, H, _, D = full.shape
    chunks = full.view(two, B, H, 2 * K, n, D).permute(3, 0, 1, 2, 4, 5)        # (2K, 2, B, H, n, D)
    return torch.stack((chunks[:K], chunks[K:].flip(0)), dim=4).reshape(K, two, B, H, 2 * n, D)


def _gather_pairs(c: int, K: int, n: int) -> list[tuple[slice, slice, bool]]:
    """(local query rows, global key rows, causal): each local chunk over every earlier chunk, then itself."""
    pairs = []
    for rows, g in zip((slice(0, n), slice(n, 2 * n)), zigzag_chunks(c, K)):
        if g > 0:
            pairs.append((rows, slice(0, g * n), False))
        pairs.append((rows, slice(g * n, (g + 1) * n), True))
    return pairs


class _AllGatherAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, comm: Communicator, scale: float):
        n, K, c = _check_qkv(q, k, v), comm.world_size, comm.rank
        acc = acc_dtype(q.dtype)
        pieces = q.new_empty((K, 2, *q.shape))
        comm.all_gather(pieces, torch.stack((k, v)), tag="cp kv")
        full = _to_global(pieces, n)                                            # (2, B, H, 2Kn, D)
        out = torch.zeros(q.shape, dtype=acc, device=q.device)
        lse = torch.full(q.shape[:-1], float("-inf"), dtype=acc, device=q.device)
        for rows, cols, causal in _gather_pairs(c, K, n):
            part, part_lse = block_attention(q[:, :, rows], full[0][:, :, cols], full[1][:, :, cols],
                                             causal=causal, scale=scale)
            _merge(out[:, :, rows], lse[:, :, rows], part, part_lse)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, full, out, lse)
        ctx.comm, ctx.scale = comm, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, full, out, lse = ctx.saved_tensors
        comm, scale = ctx.comm, ctx.scale
        n, K, c = q.shape[2] // 2, comm.world_size, comm.rank
        dout = dout.to(q.dtype).contiguous()
        acc = acc_dtype(q.dtype)
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        dfull = torch.zeros(full.shape, dtype=acc, device=q.device)            # (2, B, H, 2Kn, D)
        for rows, cols, causal in _gather_pairs(c, K, n):
            gq, gk, gv = block_attention_backward(dout[:, :, rows], q[:, :, rows], full[0][:, :, cols],
                                                  full[1][:, :, cols], out[:, :, rows], lse[:, :, rows],
                                                  causal=causal, scale=scale)
            dq[:, :, rows] += gq
            dfull[0][:, :, cols] += gk
            dfull[1][:, :, cols] += gv
        mine = dfull.new_empty((2, *q.shape))
        comm.reduce_scatter(mine, _to_pieces(dfull, K, n), op="sum", tag="cp dkv")
        return dq.to(q.dtype), mine[0].to(q.dtype), mine[1].to(q.dtype), None, None


def allgather_attention(q, k, v, comm: Communicator, *, scale: float | None = None) -> torch.Tensor:
    """The same result as ring_attention, by one all-gather of K/V through `comm` (the cp group's
    Communicator) and a reduce-scatter of dK/dV in backward."""
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return _AllGatherAttention.apply(q, k, v, comm, scale)
