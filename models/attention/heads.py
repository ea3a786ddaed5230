"""Reshapes between the residual layout (B, T, C) and the per-head layout (B, H, T, D)."""

from __future__ import annotations

import torch
from torch import nn

from ..rope import RotaryEmbedding


def split_heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """(B, T, H*D) -> (B, H, T, D)."""
    B, T, C = x.shape
    return x.view(B, T, n_heads, C // n_heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, H, T, D) -> (B, T, H*D)."""
    B, H, T, D = x.shape
    return x.transpose(1, 2).reshape(B, T, H * D)


def check_heads(d_model: int, n_heads: int) -> int:
    """The head dim D = d_model / n_heads; ValueError if it does not divide."""
    if n_heads < 1 or d_model % n_heads:
        raise ValueError(f"model.d_model={d_model} must be divisible by model.n_heads={n_heads}")
    return d_model // n_heads


class MultiHeadAttentionBase(nn.Module):
    """What the multi-head variants share: fused q/k/v projection, output projection
    (`out_proj`, a residual projection for init scaling) and RoPE on q and k."""

    replaces_mlp = False

    def __init__(self, d_model: int, n_heads: int, *, rope: bool = True, rope_theta: float = 10000.0):
        super().__init__()
        self.n_heads = n_heads
        self.head_dim = check_heads(d_model, n_heads)
        self.qkv_proj = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out_proj = nn.Linear(d_model, d_model, bias=False)
        self.rope = RotaryEmbedding(self.head_dim, rope_theta) if rope else None
        self.cp = None
        """Context parallelism: an object handed in (a ContextShard) when each rank holds part of
        every sequence; x then carries this rank's T/K tokens. None: the whole sequence is here."""

    def positions(self, local_len: int, device) -> torch.Tensor | None:
        """The global positions of this rank's tokens under context parallelism, else None (0..T-1)."""
        return None if self.cp is None else self.cp.positions(local_len * self.cp.size, device)

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, T, C) -> q, k, v each (B, H, T, D); q and k rotated when RoPE is on (global positions)."""
        q, k, v = (split_heads(t, self.n_heads) for t in self.qkv_proj(x).chunk(3, dim=-1))
        if self.rope is not None:
            pos = self.positions(x.shape[1], x.device)
            whole = None if self.cp is None else x.shape[1] * self.cp.size
            q, k = self.rope(q, pos, whole), self.rope(k, pos, whole)
        return q, k, v
