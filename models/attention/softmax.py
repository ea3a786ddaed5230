"""Causal softmax attention (the baseline), through F.scaled_dot_product_attention."""

from __future__ import annotations

import torch
from torch.nn import functional as F

from .heads import MultiHeadAttentionBase, merge_heads


class SoftmaxAttention(MultiHeadAttentionBase):
    """Multi-head causal attention softmax(q k^T / sqrt(D)) v, RoPE on q and k.

    The mask is top-left aligned (query i sees keys 0..i), as `is_causal=True` gives
    when query and key lengths are equal. `out_proj` is a residual output projection.
    Under context parallelism (`self.cp`, balanced layout) the keys held elsewhere come by ring
    attention (parallel/ring_attention.py, through the handed-in shard).
    """

    def __init__(self, d_model: int, n_heads: int, *, rope: bool = True, rope_theta: float = 10000.0):
        super().__init__(d_model, n_heads, rope=rope, rope_theta=rope_theta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, T, C)
        q, k, v = self.project_qkv(x)  # (B, H, T, D) each
        if self.cp is not None:
            out = self.cp.attention(q, k, v)  # (B, H, T/K, D): this rank's queries over the whole sequence
        else:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, D)
        return self.out_proj(merge_heads(out))

    def flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs per token of q k^T and A v: 2 * 2 * T * D per head (PaLM: full T, mask not subtracted)."""
        return 4.0 * self.n_heads * self.head_dim * seq_len
