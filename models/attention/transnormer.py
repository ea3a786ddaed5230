"""TransNormer's NormAttention (Qin et al. 2022): linear attention with a norm instead of a denominator."""

from __future__ import annotations

import torch
from torch import nn

from ..norm import rms_normalize
from .causal_linear import causal_linear_attention, chunked_linear_attention_flops
from .heads import MultiHeadAttentionBase, merge_heads
from .linear import elu_feature_map


class NormAttention(MultiHeadAttentionBase):
    """O = Norm(phi(Q) (phi(K)^T V)), causal: o_i = Norm(sum_{j<=i} (phi(q_i).phi(k_j)) v_j).

    Pinned: phi(x) = 1 + elu(x) (the same map as linear attention); no denominator,
    the sum grows with i and the norm removes that scale. Norm = RMSNorm over each
    head's D channels (statistics per head, eps = attention.eps) followed by a
    learned gain per channel (H*D values, init 1). RoPE, when on, rotates q and k
    before the feature map (as in linear.py). Chunk-wise via the shared helper with
    normalize=False; states in float32.
    """

    def __init__(self, d_model: int, n_heads: int, *, chunk_size: int = 64, eps: float = 1e-6,
                 rope: bool = True, rope_theta: float = 10000.0):
        super().__init__(d_model, n_heads, rope=rope, rope_theta=rope_theta)
        self.chunk_size = chunk_size
        self.eps = eps
        self.norm_weight = nn.Parameter(torch.ones(n_heads, 1, self.head_dim))  # per-channel gain

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, T, C)
        q, k, v = self.project_qkv(x)  # (B, H, T, D) each
        out = causal_linear_attention(elu_feature_map(q), elu_feature_map(k), v, self.chunk_size,
                                      normalize=False)  # (B, H, T, D), float32
        out = rms_normalize(out, self.eps) * self.norm_weight.to(out.dtype)
        return self.out_proj(merge_heads(out.to(v.dtype)))

    def flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs per token of the chunk-wise mixing, all heads (no denominator)."""
        return self.n_heads * chunked_linear_attention_flops(seq_len, self.chunk_size, self.head_dim,
                                                             self.head_dim, normalize=False)
