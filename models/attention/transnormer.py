"""TransNormer (Qin et al. 2022, "The Devil in Linear Transformer"): DiagAttention in the lower
layers (softmax inside non-overlapping blocks: those layers attend locally, against the attention
dilution of linear attention) and NormAttention above (linear attention with a norm instead of a
denominator). `build_attention` picks per layer from attention.diag_layers."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..norm import rms_normalize
from .causal_linear import causal_linear_attention, chunked_linear_attention_flops
from .heads import MultiHeadAttentionBase, merge_heads
from .linear import elu_feature_map
from .state_passing import initial_state


class NormAttention(MultiHeadAttentionBase):
    """O = Norm(phi(Q) (phi(K)^T V)), causal: o_i = Norm(sum_{j<=i} (phi(q_i).phi(k_j)) v_j).

    Pinned: phi(x) = 1 + elu(x) (the same map as linear attention); no denominator,
    the sum grows with i and the norm removes that scale. Norm = RMSNorm over each
    head's D channels (statistics per head, eps = attention.eps) followed by a
    learned gain per channel (H*D values, init 1). RoPE, when on, rotates q and k
    before the feature map (as in linear.py). Chunk-wise via the shared helper with
    normalize=False; states in float32. Context parallelism: the earlier ranks' S as the initial
    state (state_passing.py); no normaliser travels.
    """

    def __init__(self, d_model: int, n_heads: int, *, chunk_size: int = 64, eps: float = 1e-6,
                 rope: bool = True, rope_theta: float = 10000.0):
        super().__init__(d_model, n_heads, rope=rope, rope_theta=rope_theta)
        self.chunk_size = chunk_size
        self.eps = eps
        self.norm_weight = nn.Parameter(torch.ones(n_heads, 1, self.head_dim))  # per-channel gain

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, T, C)
        q, k, v = self.project_qkv(x)  # (B, H, T, D) each
        phi_q, phi_k = elu_feature_map(q), elu_feature_map(k)
        initial = initial_state(self.cp, phi_k, v, normalize=False) if self.cp is not None else None
        out = causal_linear_attention(phi_q, phi_k, v, self.chunk_size, normalize=False,
                                      initial=initial)  # (B, H, T, D), float32
        out = rms_normalize(out, self.eps) * self.norm_weight.to(out.dtype)
        return self.out_proj(merge_heads(out.to(v.dtype)))

    def flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs per token of the chunk-wise mixing, all heads (no denominator)."""
        return self.n_heads * chunked_linear_attention_flops(seq_len, self.chunk_size, self.head_dim,
                                                             self.head_dim, normalize=False)


class DiagAttention(MultiHeadAttentionBase):
    """Causal softmax attention inside non-overlapping blocks of `block_size` tokens.

    Query i in block b = i // block_size sees keys b * block_size .. i only: the attention
    matrix is block-diagonal, each block causal (top-left aligned). A ragged last block is
    padded at its end, which no real query can see (the pads come after it), then cut off.
    O(T * block_size) time and memory. RoPE rotates q and k with their global positions.
    Context parallelism: the config keeps every block inside one rank's slice, so nothing travels.
    """

    def __init__(self, d_model: int, n_heads: int, *, block_size: int = 64, rope: bool = True,
                 rope_theta: float = 10000.0):
        super().__init__(d_model, n_heads, rope=rope, rope_theta=rope_theta)
        if block_size < 1:
            raise ValueError(f"attention.block_size must be >= 1, got {block_size}")
        self.block_size = block_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, T, C)
        q, k, v = self.project_qkv(x)  # (B, H, T, D) each
        B, H, T, D = q.shape
        blk = min(self.block_size, T)
        pad = -T % blk
        if pad:
            q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
        n = (T + pad) // blk
        q, k, v = (t.reshape(B, H, n, blk, D) for t in (q, k, v))  # (B, H, nblocks, blk, D)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # per block
        out = out.reshape(B, H, n * blk, D)[:, :, :T]  # (B, H, T, D)
        return self.out_proj(merge_heads(out))

    def flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs per token of q k^T and A v inside a block: 2 * 2 * blk * D per head."""
        return 4.0 * self.n_heads * self.head_dim * min(self.block_size, seq_len)
