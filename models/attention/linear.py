"""Causal linear attention ("Transformers are RNNs", Katharopoulos et al. 2020)."""

from __future__ import annotations

import torch
from torch.nn import functional as F

from .causal_linear import causal_linear_attention, chunked_linear_attention_flops
from .heads import MultiHeadAttentionBase, merge_heads
from .state_passing import initial_state


def elu_feature_map(x: torch.Tensor) -> torch.Tensor:
    """phi(x) = elu(x) + 1, in >= float32: positive, so the denominator is never 0."""
    return F.elu(x.to(torch.promote_types(x.dtype, torch.float32))) + 1.0


class LinearAttention(MultiHeadAttentionBase):
    """o_i = phi(q_i) S_i / (phi(q_i) z_i + eps), phi = elu + 1, computed chunk-wise.

    S_i = sum_{j<=i} phi(k_j) v_j^T and z_i = sum_{j<=i} phi(k_j), accumulated in
    float32 (see causal_linear.py). No 1/sqrt(D) scale: the normalisation divides it out.

    RoPE placement (pinned): q and k are rotated *before* the feature map. Rotating
    phi(q), phi(k) instead (RoFormer's variant) makes features negative, so the
    denominator phi(q) z could reach 0; rotating first keeps every score positive
    and the formula of docs/design.md exact, at the cost of the relative-position identity
    holding only for the pre-feature dot product.

    Context parallelism (`self.cp`): the chunk loop starts from the earlier ranks' S and z
    (state_passing.py), so the output is the one-rank formula's.
    """

    def __init__(self, d_model: int, n_heads: int, *, chunk_size: int = 64, eps: float = 1e-6,
                 rope: bool = True, rope_theta: float = 10000.0):
        super().__init__(d_model, n_heads, rope=rope, rope_theta=rope_theta)
        self.chunk_size = chunk_size
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, T, C)
        q, k, v = self.project_qkv(x)  # (B, H, T, D) each
        phi_q, phi_k = elu_feature_map(q), elu_feature_map(k)
        initial = initial_state(self.cp, phi_k, v, normalize=True) if self.cp is not None else None
        out = causal_linear_attention(phi_q, phi_k, v, self.chunk_size, self.eps, initial=initial)
        return self.out_proj(merge_heads(out.to(v.dtype)))

    def flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs per token of the chunk-wise mixing, all heads (feature dim F = D)."""
        return self.n_heads * chunked_linear_attention_flops(seq_len, self.chunk_size, self.head_dim, self.head_dim)
