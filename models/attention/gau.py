"""Gated attention unit with FLASH's mixed chunk attention (Hua et al. 2022, "Transformer Quality in Linear Time")."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from ..rope import RotaryEmbedding
from .state_passing import earlier_sum


def _chunk_len(seq_len: int, chunk_size: int) -> int:
    # A sequence no longer than one chunk is one (shorter) chunk: the same pairs as padding it.
    return min(chunk_size, seq_len)


def gau_mixing(quad_q: torch.Tensor, quad_k: torch.Tensor, lin_q: torch.Tensor, lin_k: torch.Tensor,
               v: torch.Tensor, chunk_size: int, initial: torch.Tensor | None = None) -> torch.Tensor:
    """FLASH mixing, chunk-wise in O(T): q/k (B, T, s), v (B, T, e) -> (B, T, e) in float32 (float64).

    With chunks of C = chunk_size tokens (position t is in chunk t // C):
        o_i = sum_{j <= i, same chunk}  relu(qq_i . qk_j / sqrt(s))^2 / C * v_j
            + sum_{j in earlier chunks} (lq_i . lk_j / sqrt(s)) / C * v_j
    Both terms divide by the configured C, never by the actual (possibly shorter)
    chunk or sequence length, so an output never depends on how many tokens follow it.

    initial (B, s, e): sum of lk_j^T v_j over every token before this slice (context parallelism:
    the earlier ranks' chunks, whole ones, as the config requires), added to every chunk's prefix.
    """
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in (quad_q, v)) else torch.float32
    B, T, s = quad_q.shape
    e = v.shape[-1]
    L = _chunk_len(T, chunk_size)
    n_chunks = math.ceil(T / L)
    pad = n_chunks * L - T
    with torch.autocast(device_type=v.device.type, enabled=False):
        # Zero-padded keys and values at the end touch no real query (they come after all of them).
        qq, qk, lq, lk, vv = (F.pad(t.to(dtype), (0, 0, 0, pad)).view(B, n_chunks, L, -1)
                              for t in (quad_q, quad_k, lin_q, lin_k, v))  # (B, N, L, s|e)
        scale = s ** -0.5
        causal = torch.ones(L, L, dtype=torch.bool, device=v.device).tril()
        scores = (qq @ qk.transpose(-1, -2)) * scale  # (B, N, L, L)
        weights = torch.relu(scores).square().masked_fill(~causal, 0.0) / chunk_size
        quad = weights @ vv  # (B, N, L, e)
        chunk_states = lk.transpose(-1, -2) @ vv  # (B, N, s, e)
        # Exclusive prefix sum: chunk n sees the states of chunks 0..n-1 only.
        # (Shift then cumsum, not cumsum minus self: no cancellation error.)
        earlier_states = torch.cat((torch.zeros_like(chunk_states[:, :1]), chunk_states[:, :-1]), dim=1).cumsum(dim=1)
        if initial is not None:
            earlier_states = earlier_states + initial.to(dtype)[:, None]
        lin = (lq @ earlier_states) * (scale / chunk_size)  # (B, N, L, e)
        return (quad + lin).reshape(B, n_chunks * L, e)[:, :T]


def gau_mixing_reference(quad_q: torch.Tensor, quad_k: torch.Tensor, lin_q: torch.Tensor, lin_k: torch.Tensor,
                         v: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """The same formula as `gau_mixing` with full T x T matrices, in float64. For tests only."""
    qq, qk, lq, lk, v = (t.double() for t in (quad_q, quad_k, lin_q, lin_k, v))
    T, s = qq.shape[1], qq.shape[2]
    chunk_id = torch.arange(T, device=v.device) // chunk_size
    causal = torch.ones(T, T, dtype=torch.bool, device=v.device).tril()
    same_chunk_causal = (chunk_id[:, None] == chunk_id[None, :]) & causal
    earlier_chunk = chunk_id[:, None] > chunk_id[None, :]
    quad_w = torch.relu(qq @ qk.transpose(-1, -2) / math.sqrt(s)).square() / chunk_size
    lin_w = (lq @ lk.transpose(-1, -2)) / math.sqrt(s) / chunk_size
    weights = quad_w * same_chunk_causal + lin_w * earlier_chunk  # (B, T, T)
    return weights @ v


class GatedAttentionUnit(nn.Module):
    """GAU layer, replacing both attention and MLP of a block (`replaces_mlp = True`).

    From the (already normed) input x (B, T, d):
        U, V = SiLU(x W_u), SiLU(x W_v)            (B, T, e), e = expansion * d
        Z    = SiLU(x W_z)                         (B, T, s), s = shared_dim
        qq, qk, lq, lk = Z * gamma_r + beta_r      four per-dim scale+offsets of one Z
        out  = (U * gau_mixing(qq, qk, lq, lk, V)) W_o
    Separate Q/K for the quadratic and the linear part follow FLASH. RoPE, when on,
    rotates all four (half-split pairing over s). gamma starts at 1 and beta at 0.
    Single-headed: n_heads does not apply. `out_proj` is a residual output projection.

    Context parallelism (`self.cp`, contiguous slices of whole chunks): the quadratic part stays
    inside a chunk, hence inside the rank; the linear part starts from the earlier ranks' sum of
    lk^T V (s x e per sequence, one all-gather, state_passing.py).
    """

    replaces_mlp = True

    def __init__(self, d_model: int, *, shared_dim: int = 128, expansion: int = 2, chunk_size: int = 256,
                 rope: bool = True, rope_theta: float = 10000.0):
        super().__init__()
        self.shared_dim = shared_dim
        self.expanded_dim = expansion * d_model
        self.chunk_size = chunk_size
        self.in_proj = nn.Linear(d_model, 2 * self.expanded_dim + shared_dim, bias=False)  # W_u | W_v | W_z
        self.qk_scale = nn.Parameter(torch.ones(4, shared_dim))
        self.qk_offset = nn.Parameter(torch.zeros(4, shared_dim))
        self.out_proj = nn.Linear(self.expanded_dim, d_model, bias=False)
        self.rope = RotaryEmbedding(shared_dim, rope_theta) if rope else None
        self.cp = None
        """Context parallelism: a handed-in ContextShard (x holds this rank's tokens), or None."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, d) -> (B, T, d)
        e, s = self.expanded_dim, self.shared_dim
        u, v, z = F.silu(self.in_proj(x)).split([e, e, s], dim=-1)  # (B, T, e), (B, T, e), (B, T, s)
        qk = z[..., None, :] * self.qk_scale + self.qk_offset  # (B, T, 4, s)
        parts = qk.unbind(dim=-2)
        if self.rope is not None:
            whole = None if self.cp is None else x.shape[1] * self.cp.size
            pos = None if self.cp is None else self.cp.positions(whole, x.device)
            parts = [self.rope(p, pos, whole) for p in parts]
        initial = self._earlier_ranks(parts[3], v) if self.cp is not None else None
        mixed = gau_mixing(*parts, v, self.chunk_size, initial)  # (B, T, e)
        return self.out_proj(u * mixed.to(u.dtype))

    def _earlier_ranks(self, lin_k: torch.Tensor, v: torch.Tensor) -> torch.Tensor | None:
        """Sum over the earlier cp ranks of lk^T V (B, s, e), in >= float32."""
        dtype = torch.float64 if torch.float64 in (lin_k.dtype, v.dtype) else torch.float32
        with torch.autocast(device_type=v.device.type, enabled=False):
            state = lin_k.to(dtype).transpose(-1, -2) @ v.to(dtype)  # (B, s, e)
            earlier, _ = earlier_sum(self.cp, state)
        return earlier

    def flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs per token of the mixing: 2 L (s + e) quadratic + 4 s e linear per token, padding counted."""
        L = _chunk_len(seq_len, self.chunk_size)
        padded = math.ceil(seq_len / L) * L
        s, e = self.shared_dim, self.expanded_dim
        return padded * (2 * L * (s + e) + 4 * s * e) / seq_len
