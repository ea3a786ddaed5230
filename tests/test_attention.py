"""Attention variants, RoPE and the chunk-wise helpers against naive float64 forms of the same formulas."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F
from torch.testing import assert_close

from models.attention import (ATTENTION_KINDS, build_attention, causal_linear_attention,
                              causal_linear_attention_reference, gau_mixing, gau_mixing_reference)
from models.attention import gau as gau_module
from models.attention import linear as linear_module
from models.attention import performer as performer_module
from models.attention import transnormer as transnormer_module
from models.attention.causal_linear import chunked_linear_attention_flops
from models.attention.linear import elu_feature_map
from models.attention.performer import PerformerAttention
from models.attention.random_features import (draw_orthogonal_features, feature_seed_for, key_features,
                                              query_features)
from models.config import AttentionConfig
from models.rope import RotaryEmbedding, apply_rope, rope_cos_sin, rotate_half

D_MODEL, N_HEADS = 16, 2  # head dim 8


def make_attention(kind: str, dtype=torch.float64, seed: int = 0, **overrides):
    """A small module of one variant; small chunks so several chunks are exercised."""
    settings = dict(kind=kind, chunk_size=4, nb_features=16, shared_dim=8, expansion=2)
    settings.update(overrides)
    torch.manual_seed(seed)
    module = build_attention(AttentionConfig(**settings), d_model=D_MODEL, n_heads=N_HEADS, seq_len=64, layer_idx=0)
    return module.to(dtype)


def randn(*shape, dtype=torch.float64, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ----------------------------------------------------------------------------- causality and shapes

@pytest.mark.parametrize("kind", ATTENTION_KINDS)
def test_future_positions_do_not_change_the_past(kind):
    module = make_attention(kind)
    x = randn(2, 13, D_MODEL)
    out = module(x)
    for t in (0, 3, 4, 9):
        changed = x.clone()
        changed[:, t + 1:] = randn(2, 13 - t - 1, D_MODEL, seed=100 + t)
        out_changed = module(changed)
        assert_close(out_changed[:, :t + 1], out[:, :t + 1], atol=1e-12, rtol=0)
        # ...and the change is visible later, so the check above is not vacuous.
        assert (out_changed[:, t + 1:] - out[:, t + 1:]).abs().max() > 1e-6


@pytest.mark.parametrize("kind", ATTENTION_KINDS)
def test_batch_one_and_sequence_one(kind):
    module = make_attention(kind)
    x = randn(3, 7, D_MODEL)
    out = module(x)
    assert out.shape == x.shape
    assert_close(module(x[1:2]), out[1:2], atol=1e-12, rtol=0)  # rows of a batch are independent
    one = module(x[:, :1])
    assert one.shape == (3, 1, D_MODEL) and torch.isfinite(one).all()
    assert_close(one, out[:, :1], atol=1e-12, rtol=0)
    assert module(x[:1, :1]).shape == (1, 1, D_MODEL)


@pytest.mark.parametrize("kind", ATTENTION_KINDS)
def test_gradcheck_float64(kind):
    module = make_attention(kind, chunk_size=2, nb_features=6, shared_dim=4)
    x = randn(1, 5, D_MODEL).requires_grad_(True)
    assert torch.autograd.gradcheck(module, (x,), eps=1e-6, atol=1e-5, rtol=1e-3)


@pytest.mark.parametrize("kind", ATTENTION_KINDS)
def test_bf16_autocast_close_to_fp32(kind):
    module = make_attention(kind, dtype=torch.float32)
    x = randn(2, 21, D_MODEL, dtype=torch.float32)
    with torch.no_grad():
        exact = module(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = module(x)
    assert low.dtype == torch.bfloat16
    assert torch.isfinite(low).all()
    rel = (low.float() - exact).norm() / exact.norm()
    assert rel < 3e-2, rel


def test_replaces_mlp_only_for_gau():
    assert {k: make_attention(k).replaces_mlp for k in ATTENTION_KINDS} == {
        "softmax": False, "linear": False, "performer": False, "gau": True, "transnormer": False}


# ----------------------------------------------------------------------------- chunk-wise == naive

LENGTHS = [1, 3, 4, 8, 13]  # chunk 4: T=1, shorter than a chunk, exact multiples, ragged last chunk
CHUNKS = [4, 16]  # 16: the chunk is longer than every T


def _naive_linear_helper(phi_q, phi_k, v, chunk_size, eps=1e-6, normalize=True, key_log_scale=None, initial=None):
    assert initial is None  # one process: nothing comes before the sequence
    return causal_linear_attention_reference(phi_q, phi_k, v, eps, normalize, key_log_scale)


def _naive_gau_mixing(qq, qk, lq, lk, v, chunk_size, initial=None):
    assert initial is None
    return gau_mixing_reference(qq, qk, lq, lk, v, chunk_size)


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("kind", ["linear", "performer", "transnormer", "gau"])
def test_module_chunked_equals_naive_module(kind, chunk, monkeypatch):
    """The whole module, with its chunk-wise kernel swapped for the O(T^2) form of the same formula."""
    module = make_attention(kind, chunk_size=chunk)
    x = randn(2, max(LENGTHS), D_MODEL)
    chunked = {T: module(x[:, :T]) for T in LENGTHS}
    for mod in (linear_module, performer_module, transnormer_module):
        monkeypatch.setattr(mod, "causal_linear_attention", _naive_linear_helper)
    monkeypatch.setattr(gau_module, "gau_mixing", _naive_gau_mixing)
    for T in LENGTHS:
        assert_close(chunked[T], module(x[:, :T]), atol=1e-11, rtol=1e-9)


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("chunk", [1, 3, 4, 16])
def test_causal_linear_helper_equals_reference(chunk, normalize):
    phi_q, phi_k = randn(2, 3, 13, 5, seed=2).exp(), randn(2, 3, 13, 5, seed=3).exp()
    v = randn(2, 3, 13, 4, seed=4)
    for T in LENGTHS:
        got = causal_linear_attention(phi_q[:, :, :T], phi_k[:, :, :T], v[:, :, :T], chunk, normalize=normalize)
        want = causal_linear_attention_reference(phi_q[:, :, :T], phi_k[:, :, :T], v[:, :, :T], normalize=normalize)
        assert_close(got, want, atol=1e-12, rtol=1e-10)


def test_linear_reference_is_the_design_recurrence():
    """o_i = phi(q_i) S_i / (phi(q_i) z_i + eps), S_i, z_i running sums: written out as the RNN."""
    q, k, v = randn(1, 2, 9, 4, seed=5), randn(1, 2, 9, 4, seed=6), randn(1, 2, 9, 3, seed=7)
    phi_q, phi_k = elu_feature_map(q), elu_feature_map(k)
    assert_close(phi_q, F.elu(q) + 1)
    S, z, outs = torch.zeros(1, 2, 4, 3, dtype=torch.float64), torch.zeros(1, 2, 4, dtype=torch.float64), []
    for i in range(9):
        S = S + phi_k[:, :, i, :, None] * v[:, :, i, None, :]
        z = z + phi_k[:, :, i]
        num = (phi_q[:, :, i, :, None] * S).sum(-2)
        den = (phi_q[:, :, i] * z).sum(-1, keepdim=True) + 1e-6
        outs.append(num / den)
    rnn = torch.stack(outs, dim=2)
    assert_close(causal_linear_attention_reference(phi_q, phi_k, v), rnn, atol=1e-13, rtol=1e-11)
    assert_close(causal_linear_attention(phi_q, phi_k, v, 4), rnn, atol=1e-13, rtol=1e-11)


def test_key_log_scale_cancels_exactly_without_eps():
    """Keys divided by exp(c_j) with a running max c: same result as the unscaled keys (eps = 0)."""
    logits = randn(2, 2, 13, 6, seed=8) * 3
    c = logits.amax(-1).cummax(-1).values
    phi_q, v = randn(2, 2, 13, 6, seed=9).exp(), randn(2, 2, 13, 3, seed=10)
    scaled_k, plain_k = torch.exp(logits - c[..., None]), torch.exp(logits)
    want = causal_linear_attention_reference(phi_q, plain_k, v, eps=0.0)
    for chunk in (1, 4, 5, 16):
        got = causal_linear_attention(phi_q, scaled_k, v, chunk, eps=0.0, key_log_scale=c)
        assert_close(got, want, atol=1e-12, rtol=1e-10)
    assert_close(causal_linear_attention_reference(phi_q, scaled_k, v, eps=0.0, key_log_scale=c), want)


def test_causal_linear_helper_accumulates_in_float32_under_bf16():
    phi = randn(1, 1, 10, 4, dtype=torch.float32).exp().bfloat16()
    v = randn(1, 1, 10, 4, dtype=torch.float32).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = causal_linear_attention(phi, phi, v, 4)
    assert out.dtype == torch.float32
    assert_close(out, causal_linear_attention_reference(phi, phi, v).float(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("chunk", [1, 4, 5, 16])
def test_gau_mixing_equals_reference(chunk):
    qq, qk, lq, lk = (randn(2, 13, 6, seed=s) for s in (11, 12, 13, 14))
    v = randn(2, 13, 5, seed=15)
    for T in LENGTHS:
        parts = [t[:, :T] for t in (qq, qk, lq, lk, v)]
        assert_close(gau_mixing(*parts, chunk), gau_mixing_reference(*parts, chunk), atol=1e-12, rtol=1e-10)


def test_gau_reference_pins_normalisation():
    """Two tokens in one chunk: relu(q.k/sqrt(s))^2 / C; across chunks: (lq.lk/sqrt(s)) / C."""
    s, C = 4, 2
    qq = torch.tensor([[[1.0, 0, 0, 0], [2.0, 0, 0, 0], [0, 0, 0, 0]]], dtype=torch.float64)
    lq = torch.tensor([[[0, 0, 0, 0], [0, 0, 0, 0], [0, 3.0, 0, 0]]], dtype=torch.float64)
    lk = torch.tensor([[[0, 5.0, 0, 0], [0, 7.0, 0, 0], [0, 0, 0, 0]]], dtype=torch.float64)
    v = torch.tensor([[[1.0], [10.0], [100.0]]], dtype=torch.float64)
    out = gau_mixing(qq, qq, lq, lk, v, C)
    quad = lambda a, b: max(a * b / math.sqrt(s), 0.0) ** 2 / C  # noqa: E731
    want = [quad(1, 1) * 1, quad(2, 1) * 1 + quad(2, 2) * 10, (3 * 5 * 1 + 3 * 7 * 10) / math.sqrt(s) / C]
    assert_close(out[0, :, 0], torch.tensor(want, dtype=torch.float64))


# ----------------------------------------------------------------------------- softmax

def test_softmax_equals_explicit_masked_softmax():
    module = make_attention("softmax", rope=False)
    x = randn(2, 9, D_MODEL)
    q, k, v = (t.view(2, 9, N_HEADS, 8).transpose(1, 2) for t in module.qkv_proj(x).chunk(3, -1))
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(8)
    scores = scores.masked_fill(~torch.ones(9, 9, dtype=torch.bool).tril(), float("-inf"))
    want = module.out_proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 9, D_MODEL))
    assert_close(module(x), want, atol=1e-12, rtol=1e-10)


def test_attention_flops_per_token():
    soft, lin = make_attention("softmax"), make_attention("linear", chunk_size=64)
    assert soft.flops_per_token(100) == 4 * N_HEADS * 8 * 100  # 4 H Q T: q k^T and A v
    # Linear attention: per-token cost does not grow with T (softmax's does, linearly)...
    assert lin.flops_per_token(4096) == pytest.approx(lin.flops_per_token(1024), rel=1e-2)
    assert soft.flops_per_token(4096) == 4 * soft.flops_per_token(1024)
    # ...and equals 2C(F+D) + 4FD + 2F per head in the long-sequence limit (F = D = 8, C = 64).
    per_head_long = 2 * 64 * 16 + 4 * 64 + 2 * 8
    assert lin.flops_per_token(1 << 16) == pytest.approx(N_HEADS * per_head_long, rel=1e-3)
    # One chunk of T=4 (F=3, D=2): 2 T^2 (F + D) quadratic, 2 T F D inter-chunk, 2 T F denominator, no update.
    assert chunked_linear_attention_flops(4, 8, 3, 2) == (2 * 16 * 5 + 2 * 4 * 3 * 2 + 2 * 4 * 3) / 4
    perf = make_attention("performer", chunk_size=64, nb_features=16)
    assert perf.flops_per_token(256) == N_HEADS * (4 * 8 * 16 + chunked_linear_attention_flops(256, 64, 16, 8))
    gau = make_attention("gau", chunk_size=64, shared_dim=8, expansion=2)
    assert gau.flops_per_token(256) == 2 * 64 * (8 + 32) + 4 * 8 * 32


# ----------------------------------------------------------------------------- RoPE

def test_rope_pairing_and_theta():
    """Half-split: channel i turns with channel i + D/2 by pos * theta^(-2i/D)."""
    cos, sin = rope_cos_sin(3, 4, 10000.0, torch.device("cpu"))
    x = torch.eye(4, dtype=torch.float32)[None].expand(3, 4, 4).transpose(0, 1)  # (4 basis vectors, T=3, D=4)
    out = apply_rope(x, cos, sin)
    for pos in range(3):
        a0, a1 = pos * 1.0, pos * 10000.0 ** (-2 / 4)
        assert_close(out[0, pos], torch.tensor([math.cos(a0), 0, math.sin(a0), 0]), atol=1e-6, rtol=0)
        assert_close(out[1, pos], torch.tensor([0, math.cos(a1), 0, math.sin(a1)]), atol=1e-6, rtol=0)
    assert_close(rotate_half(torch.tensor([1.0, 2, 3, 4])), torch.tensor([-3.0, -4, 1, 2]))


def test_rope_preserves_norms():
    rope = RotaryEmbedding(8)
    x = randn(2, 3, 50, 8)
    assert_close(rope(x).norm(dim=-1), x.norm(dim=-1), atol=1e-6, rtol=1e-6)


def test_rope_scores_depend_only_on_relative_position():
    rope = RotaryEmbedding(8)
    q, k = randn(8, seed=20), randn(8, seed=21)
    T = 40
    rq, rk = rope(q.expand(T, 8)), rope(k.expand(T, 8))
    scores = rq @ rk.T  # (T, T): scores[m, n] = q_m . k_n
    for offset in (-7, 0, 5, 30):
        diagonal = torch.diagonal(scores, offset=offset)
        assert_close(diagonal, diagonal[:1].expand_as(diagonal), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(torch.diagonal(scores, 0)[0], torch.diagonal(scores, 5)[0])


def test_rope_tables_are_float32_under_bf16():
    rope = RotaryEmbedding(8)
    x = randn(1, 2, 300, 8, dtype=torch.float32).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cos, sin = rope.cos_sin(300, x.device)
        out = rope(x)
    assert cos.dtype == sin.dtype == torch.float32
    assert out.dtype == torch.bfloat16
    # Rotating in float32 and rounding once: positions past 256 (not exact in bf16) still right.
    assert torch.equal(out, rope(x.float()).bfloat16())
    angles = torch.arange(300, dtype=torch.float64)
    assert_close(cos[:, 0].double(), angles.cos(), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- Performer features

def test_performer_same_seed_and_step_same_matrix():
    torch.manual_seed(1)
    a = PerformerAttention(D_MODEL, N_HEADS, nb_features=20, feature_seed=7, layer_idx=3)
    torch.manual_seed(2)
    b = PerformerAttention(D_MODEL, N_HEADS, nb_features=20, feature_seed=7, layer_idx=3)
    assert torch.equal(a.projection, b.projection)
    a.redraw(5000)
    b.redraw(5000)
    assert torch.equal(a.projection, b.projection)
    other_layer = PerformerAttention(D_MODEL, N_HEADS, nb_features=20, feature_seed=7, layer_idx=4)
    other_seed = PerformerAttention(D_MODEL, N_HEADS, nb_features=20, feature_seed=8, layer_idx=3)
    assert not torch.equal(other_layer.projection, b.projection)
    assert not torch.equal(other_seed.projection, b.projection)
    assert feature_seed_for(7, 3, 5000) == feature_seed_for(7, 3, 5000) != feature_seed_for(7, 3, 5001)


def test_performer_redraws_at_the_interval_only():
    module = PerformerAttention(D_MODEL, N_HEADS, nb_features=16, redraw_interval=3)
    initial = module.projection.clone()
    for step in (1, 2):
        module.set_step(step)
        assert torch.equal(module.projection, initial)
    module.set_step(3)
    after_three = module.projection.clone()
    assert not torch.equal(after_three, initial)
    module.set_step(4)
    module.set_step(5)
    assert torch.equal(module.projection, after_three)
    module.set_step(6)
    assert not torch.equal(module.projection, after_three)
    never = PerformerAttention(D_MODEL, N_HEADS, nb_features=16, redraw_interval=0)
    before = never.projection.clone()
    for step in (0, 1, 1000):
        never.set_step(step)
    assert torch.equal(never.projection, before)


def test_performer_projection_is_a_checkpointed_buffer():
    a = PerformerAttention(D_MODEL, N_HEADS, nb_features=16, redraw_interval=2)
    a.set_step(2)
    assert "projection" in a.state_dict() and "projection" not in dict(a.named_parameters())
    b = PerformerAttention(D_MODEL, N_HEADS, nb_features=16, redraw_interval=2)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.projection, b.projection)


def test_performer_features_orthogonal_within_a_block():
    D, m = 8, 2 * 8 + 3
    w = draw_orthogonal_features(m, D, seed=123)
    assert w.shape == (m, D)
    for start in range(0, m, D):
        block = w[start:start + D]
        gram = block @ block.T
        off_diagonal = gram - torch.diag(torch.diagonal(gram))
        assert off_diagonal.abs().max() < 1e-10 * gram.abs().max()
    cross = w[:D] @ w[D:2 * D].T  # different blocks are independent, not orthogonal
    assert cross.abs().max() > 1e-3


def test_performer_features_approximate_softmax_attention():
    """With many features, FAVOR+ with both causal stabilisers estimates softmax(q k^T / sqrt(D)) v."""
    D, T = 4, 12
    q, k, v = randn(1, 1, T, D, seed=30) * 0.7, randn(1, 1, T, D, seed=31) * 0.7, randn(1, 1, T, D, seed=32)
    w = draw_orthogonal_features(16384, D, seed=1)  # the estimate is heavy-tailed; many features, fixed seed
    phi_k, c = key_features(k, w)
    approx = causal_linear_attention(query_features(q, w), phi_k, v, 5, key_log_scale=c)
    scores = (q @ k.transpose(-1, -2) / math.sqrt(D)).masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(),
                                                                 float("-inf"))
    exact = scores.softmax(-1) @ v
    assert (approx - exact).norm() / exact.norm() < 0.08
    wrong_scale = causal_linear_attention(query_features(q * 2, w), key_features(k, w)[0], v, 5,
                                          key_log_scale=c)
    assert (wrong_scale - exact).norm() / exact.norm() > 0.15  # the check can tell a wrong kernel


def test_performer_key_stabiliser_is_causal_running_max():
    k = randn(1, 1, 9, 4, seed=40)
    w = draw_orthogonal_features(8, 4, seed=1)
    _, c = key_features(k, w)
    bigger = k.clone()
    bigger[:, :, 6] *= 10  # a huge future key
    _, c_big = key_features(bigger, w)
    assert torch.equal(c[..., :6], c_big[..., :6])
    assert (c[..., 1:] >= c[..., :-1]).all()


# ----------------------------------------------------------------------------- TransNormer's DiagAttention

def _naive_block_softmax(q, k, v, block):
    """softmax(q k^T / sqrt(D) + mask) v with the block-diagonal causal mask written out in full."""
    T = q.shape[-2]
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    allowed = (j <= i) & (i // block == j // block)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    return torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1) @ v


@pytest.mark.parametrize("block", [1, 3, 4, 16])
@pytest.mark.parametrize("rope", [True, False])
def test_diag_attention_equals_the_naive_masked_form(block, rope):
    from models.attention import DiagAttention
    from models.attention.heads import merge_heads
    torch.manual_seed(0)
    module = DiagAttention(D_MODEL, 2, block_size=block, rope=rope).double()
    for T in [1, 3, 4, 8, 13]:
        x = randn(2, T, D_MODEL)
        q, k, v = module.project_qkv(x)
        want = module.out_proj(merge_heads(_naive_block_softmax(q, k, v, block)))
        assert_close(module(x), want, atol=1e-12, rtol=1e-10)
    x = randn(1, 7, D_MODEL).requires_grad_(True)
    assert torch.autograd.gradcheck(module, (x,), eps=1e-6, atol=1e-5, rtol=1e-3)


def test_transnormer_puts_diag_attention_in_the_lower_layers():
    from models.attention import DiagAttention, NormAttention
    from models.config import AttentionConfig, ModelConfig
    from models.transformer import DecoderLM
    kinds = lambda **kw: [type(b.attn) for b in DecoderLM(  # noqa: E731
        ModelConfig(vocab_size=32, seq_len=16, d_model=16, n_layers=4, n_heads=2),
        AttentionConfig(kind="transnormer", **kw)).blocks]
    assert kinds() == [DiagAttention] * 2 + [NormAttention] * 2       # the paper's split: the lower half
    assert kinds(diag_layers=0) == [NormAttention] * 4
    assert kinds(diag_layers=3) == [DiagAttention] * 3 + [NormAttention]
    assert kinds(diag_layers=9) == [DiagAttention] * 4
    with pytest.raises(ValueError, match="attention.block_size"):
        AttentionConfig(kind="transnormer", block_size=0).validate()
    with pytest.raises(ValueError, match="attention.diag_layers"):
        AttentionConfig(kind="transnormer", diag_layers=-2).validate()
