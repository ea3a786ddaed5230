"""Rotary position embedding (RoFormer), with the pairing and precision docs/design.md pins.

Pairing is half-split: channel i is rotated together with channel i + D/2
(`rotate_half`), as in GPT-NeoX / LLaMA, not interleaved (2i, 2i+1). Channel pair i
turns by angle pos * theta^(-2i/D). Positions, frequencies, cos and sin are computed
in float32 whatever the activations' dtype (bf16 cannot even represent positions
above 256 exactly); the rotation runs in float32 (float64 for float64 inputs) and
the result is cast back to the input dtype.
"""

from __future__ import annotations

import torch
from torch import nn


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) with x1 = x[..., :D/2], x2 = x[..., D/2:]."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_cos_sin(seq_len: int, head_dim: int, theta: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables, each (T, D) float32, for positions 0..T-1."""
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head dim, got {head_dim}")
    # Autocast must not turn the outer product into bf16.
    with torch.autocast(device_type=torch.device(device).type, enabled=False):
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
        positions = torch.arange(seq_len, device=device, dtype=torch.float32)
        angles = torch.outer(positions, inv_freq)  # (T, D/2)
        angles = torch.cat((angles, angles), dim=-1)  # (T, D): pair i and i + D/2 share an angle
        return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (..., T, D) by the (T, D) tables; math in >= float32, result in x.dtype."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    return (xf * cos + rotate_half(xf) * sin).to(x.dtype)


class RotaryEmbedding(nn.Module):
    """Applies RoPE to (..., T, D) tensors; cos/sin cached per (T, device), never saved."""

    def __init__(self, head_dim: int, theta: float = 10000.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head dim, got {head_dim}")
        self.head_dim = head_dim
        self.theta = float(theta)
        self._cache: dict[tuple[int, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}
        self._gathered: tuple | None = None  # (positions, seq_len, cos rows, sin rows), see _at

    def cos_sin(self, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(T, D) float32 cos and sin tables for this module's head dim and theta."""
        key = (seq_len, torch.device(device))
        tables = self._cache.get(key)
        if tables is None:
            # Tables built under inference_mode could not be reused by a later autograd forward.
            with torch.inference_mode(False):
                tables = rope_cos_sin(seq_len, self.head_dim, self.theta, device)
            self._cache[key] = tables
        return tables

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None, seq_len: int | None = None
                ) -> torch.Tensor:
        """(..., T, D) -> (..., T, D). positions (T,) int64, each below seq_len: every token's place
        in its sequence of seq_len tokens (context parallelism holds a sequence's tokens, out of
        order); None = 0 .. T-1. seq_len is given, not read off positions, to keep the GPU from
        waiting on a max."""
        if positions is None:
            cos, sin = self.cos_sin(x.shape[-2], x.device)
        else:
            cos, sin = self._at(positions, seq_len)
        return apply_rope(x, cos, sin)

    def _at(self, positions: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The tables' rows for `positions`, gathered once per positions tensor (the context-parallel
        shard hands out the same one for every call), so q, k (GAU: four parts) and the tensors
        autograd keeps for backward share one copy instead of one each."""
        held = self._gathered
        if held is None or held[0] is not positions or held[1] != seq_len:
            cos, sin = self.cos_sin(seq_len, positions.device)
            with torch.inference_mode(False):
                held = self._gathered = (positions, seq_len, cos[positions], sin[positions])
        return held[2], held[3]

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, theta={self.theta}"
