"""RMSNorm (Zhang & Sennrich 2019): x / rms(x) * gain, no mean subtraction, no bias."""

from __future__ import annotations

import torch
from torch import nn


def rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2, last dim) + eps), computed in float32 (or float64) and cast back."""
    # Squares of bf16/fp16 activations lose too much in the mean; do it at >= float32.
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    out = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    return out.to(x.dtype)


class RMSNorm(nn.Module):
    """RMS normalisation over the last dimension with a learned per-channel gain (init 1)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_normalize(x, self.eps) * self.weight.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
