"""Causal ring attention and the all-gather baseline (parallel/ring_attention.py): the block
functions and their math fallback, the pairs each ring step computes, the byte formulas, and
both methods over cp groups of 1 to 4 ranks against one process attending over everything."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F
from torch.testing import assert_close

from harness import WorkerPool
from parallel import ring_attention as ra

CASE = "ring_attention_cases:matches_single_process"


@pytest.fixture(scope="module")
def pool():
    p = WorkerPool(4)
    yield p
    p.close()


def _qkv(*shapes, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g, dtype=torch.float64).to(dtype) for s in shapes]


@pytest.mark.parametrize("flash", [True, False], ids=["flash-op", "math-fallback"])
def test_blocks_merged_by_lse_give_exact_attention_and_gradients(monkeypatch, flash):
    """A query chunk over an earlier whole chunk and its own causal one, merged by lse, equals
    masked SDPA; per-block backward with the merged out and lse gives the exact gradients."""
    if not flash:  # the path every non-CPU device takes
        monkeypatch.setattr(ra, "_use_flash", lambda q: False)
    n, scale = 5, 0.41
    q, k, v, dout = _qkv((2, 2, n, 8), (2, 2, 2 * n, 8), (2, 2, 2 * n, 8), (2, 2, n, 8))
    early, own = slice(0, n), slice(n, 2 * n)
    o1, l1 = ra.block_attention(q, k[:, :, early], v[:, :, early], causal=False, scale=scale)
    o2, l2 = ra.block_attention(q, k[:, :, own], v[:, :, own], causal=True, scale=scale)
    out, lse = o1.clone(), l1.clone()
    ra._merge(out, lse, o2, l2)
    mask = torch.ones(n, 2 * n, dtype=torch.bool).tril(n)                  # query i sees keys <= n + i
    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    want = F.scaled_dot_product_attention(qr, kr, vr, attn_mask=mask, scale=scale)
    assert_close(out, want.detach(), atol=1e-13, rtol=0)
    s = (q @ k.transpose(-2, -1) * scale).masked_fill(~mask, float("-inf"))
    assert_close(lse, torch.logsumexp(s, -1), atol=1e-13, rtol=0)
    want_grads = torch.autograd.grad(want, (qr, kr, vr), dout)
    g1 = ra.block_attention_backward(dout, q, k[:, :, early], v[:, :, early], out, lse, causal=False, scale=scale)
    g2 = ra.block_attention_backward(dout, q, k[:, :, own], v[:, :, own], out, lse, causal=True, scale=scale)
    assert_close(g1[0] + g2[0], want_grads[0], atol=1e-13, rtol=0)
    assert_close(torch.cat([g1[1], g2[1]], 2), want_grads[1], atol=1e-13, rtol=0)
    assert_close(torch.cat([g1[2], g2[2]], 2), want_grads[2], atol=1e-13, rtol=0)
    with pytest.raises(ValueError, match="as many queries as keys"):
        ra.block_attention(q, k, v, causal=True, scale=scale)


@pytest.mark.parametrize("K", [1, 2, 3, 4, 5])
def test_ring_steps_cover_the_causal_triangle_once(K):
    """Over the K steps every rank computes each visible (query chunk, key chunk) pair exactly
    once, causal on the diagonal only, and every step after the first two whole pairs."""
    n = 1  # one token per chunk: local rows are chunk indices
    for c in range(K):
        mine = ra.zigzag_chunks(c, K)
        seen = []
        for s in range(K):
            r = (c - s) % K
            theirs = ra.zigzag_chunks(r, K)
            step = [(mine[a], theirs[b], causal) for rows, cols, causal in ra._pairs(c, r, n)
                    for a in range(2 * n)[rows] for b in range(2 * n)[cols]]
            if s > 0:
                assert len(step) == 2 and not any(causal for *_, causal in step), (c, s, step)
            seen += step
        assert sorted(seen) == sorted((a, b, a == b) for a in mine for b in range(2 * K) if b <= a)
    assert [ra.zigzag_chunks(c, 4) for c in range(4)] == [(0, 7), (1, 6), (2, 5), (3, 4)]


def test_byte_formulas():
    shape = (2, 3, 10, 8)                          # N = 480 elements of K (and of V) per rank
    assert ra.cp_attention_bytes("ring", shape, torch.float32, 4) == (3 * 960 * 4, 3 * 960 * 4 + 4 * 960 * 4)
    assert ra.cp_attention_bytes("ring", shape, torch.bfloat16, 4) == (3 * 960 * 2, 3 * 960 * 2 + 4 * 960 * 4)
    assert ra.cp_attention_bytes("allgather", shape, torch.bfloat16, 4) == (3 * 960 * 2, 3 * 960 * 4)
    assert ra.cp_attention_bytes("allgather", shape, torch.float64, 2) == (960 * 8, 960 * 8)
    assert ra.cp_attention_bytes("ring", shape, torch.float32, 1) == (0, 0)
    with pytest.raises(ValueError, match="method"):
        ra.cp_attention_bytes("ulysses", shape, torch.float32, 2)


@pytest.mark.parametrize("groups, Tc, scale", [
    ([[0, 1], [2, 3]], 3, None),                   # two K = 2 groups at once, one not starting at rank 0
    ([[0, 1, 2], [3]], 5, 0.37),                   # K = 3, and K = 1 (no traffic) beside it
    ([[0, 1, 2, 3]], 3, 1.3),
], ids=["K2x2", "K3+K1", "K4"])
def test_float64_matches_single_process(pool, groups, Tc, scale):
    """ring and allgather: out, dq, dk, dv equal the whole-sequence reference to 1e-12, bytes
    sent equal cp_attention_bytes, and blocked seconds are counted (assertions in the case)."""
    res = pool.run(CASE, groups=groups, Tc=Tc, scale=scale)
    assert sorted((r["K"], r["c"]) for r in res) == sorted((len(g), c) for g in groups for c in range(len(g)))


# float32: eps 6e-8 (unit roundoff); with O(1) inputs, sums of <= 40 terms and a few roundings
# per merge the errors stay near 1e-6, so 2e-5 fails any wrong pair (errors O(1)) but not rounding.
# bf16: inputs are exact bf16 values; each block's output and gradients are rounded to bf16 (unit
# roundoff 4e-3, so half an ulp of the largest values, ~4, is 8e-3) before the float32 merge. The
# bar is plain SDPA in bf16 on the same inputs: at most 3x its error plus 2 ulps of 1 (measured:
# both near 1e-2 at worst), and never beyond 3e-2 absolute; a wrong pair is off by O(1).
def test_float32_and_bf16_match_within_rounding(pool):
    pool.run(CASE, groups=[[0, 1, 2, 3]], Tc=5, scale=None, dtype="float32", atol=2e-5, rtol=2e-5)
    res = pool.run(CASE, groups=[[0, 1, 2, 3]], Tc=5, scale=None, dtype="bfloat16", atol=3e-2, rtol=0)
    for r in res:
        for method in ("ring", "allgather"):
            for name, got, bar in zip(("out", "dq", "dk", "dv"), r["err"][method], r["err"]["sdpa"]):
                assert got <= 3 * bar + 2 * 2 ** -8, (method, name, got, bar)
