"""The position-wise feed-forward block of a decoder layer."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class GeluMLP(nn.Module):
    """Linear(d -> h) -> GELU (exact erf form) -> Linear(h -> d), no biases.

    GELU rather than SwiGLU so that `mlp_ratio` is the hidden width ratio as written
    (h = mlp_ratio * d, 2 matrices, 2*d*h parameters) with no 2/3 rescaling to explain.
    `down_proj` is a residual output projection (scaled init in DecoderLM).
    """

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.up_proj = nn.Linear(d_model, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, T, C)
        return self.down_proj(F.gelu(self.up_proj(x)))
