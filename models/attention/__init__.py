"""Token-mixing layers: every one maps (B, T, C) -> (B, T, C), causally, with its own projections.

Each module also has `replaces_mlp` (True only for GAU, which stands in for both
attention and MLP) and `flops_per_token(seq_len)`: the forward matmul FLOPs per
token of its mixing, without the q/k/v/out projections (those are in 6N).
"""

from __future__ import annotations

from torch import nn

from ..config import ATTENTION_KINDS, AttentionConfig
from .causal_linear import causal_linear_attention, causal_linear_attention_reference
from .gau import GatedAttentionUnit, gau_mixing, gau_mixing_reference
from .linear import LinearAttention
from .performer import PerformerAttention
from .softmax import SoftmaxAttention
from .transnormer import DiagAttention, NormAttention

__all__ = [
    "ATTENTION_KINDS", "build_attention", "SoftmaxAttention", "LinearAttention", "PerformerAttention",
    "GatedAttentionUnit", "NormAttention", "DiagAttention", "causal_linear_attention", "causal_linear_attention_reference",
    "gau_mixing", "gau_mixing_reference",
]


def build_attention(cfg: AttentionConfig, *, d_model: int, n_heads: int, seq_len: int, layer_idx: int,
                    n_layers: int | None = None) -> nn.Module:
    """The mixing layer `cfg.kind` for one decoder block.

    seq_len is the model's maximum context: checked here, used by none of the current
    variants' parameters. layer_idx seeds Performer's per-layer random features and, with
    n_layers (the model's depth), picks TransNormer's DiagAttention for the lower blocks.
    """
    cfg.validate()
    if seq_len < 1:
        raise ValueError(f"model.seq_len must be >= 1, got {seq_len}")
    if layer_idx < 0:
        raise ValueError(f"layer_idx must be >= 0, got {layer_idx}")
    rope = dict(rope=cfg.rope, rope_theta=cfg.rope_theta)
    if cfg.kind == "softmax":
        return SoftmaxAttention(d_model, n_heads, **rope)
    if cfg.kind == "linear":
        return LinearAttention(d_model, n_heads, chunk_size=cfg.chunk_size, eps=cfg.eps, **rope)
    if cfg.kind == "performer":
        return PerformerAttention(d_model, n_heads, nb_features=cfg.nb_features, redraw_interval=cfg.redraw_interval,
                                  feature_seed=cfg.feature_seed, layer_idx=layer_idx, chunk_size=cfg.chunk_size,
                                  eps=cfg.eps, **rope)
    if cfg.kind == "gau":
        return GatedAttentionUnit(d_model, shared_dim=cfg.shared_dim, expansion=cfg.expansion,
                                  chunk_size=cfg.chunk_size, **rope)
    if cfg.kind == "transnormer":
        if layer_idx < cfg.diag_layer_count(n_layers if n_layers is not None else layer_idx + 1):
            return DiagAttention(d_model, n_heads, block_size=cfg.block_size, **rope)
        return NormAttention(d_model, n_heads, chunk_size=cfg.chunk_size, eps=cfg.eps, **rope)
    raise AssertionError(f"unhandled attention.kind {cfg.kind!r}")  # validate() admits only ATTENTION_KINDS
