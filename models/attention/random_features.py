"""FAVOR+ positive orthogonal random features (Choromanski et al. 2021), as docs/design.md pins them.

phi(x) = exp(w x' - |x'|^2 / 2 - stabiliser) / sqrt(m), x' = x * D^(-1/4), so that
E[phi(q) . phi(k)] = exp(q . k / sqrt(D)) * exp(-stabilisers): the softmax kernel.

Stabilisers (pinned), both causal and both cancelling between the numerator and the
denominator of the attention ratio (up to its eps):
- query i: the max over features of its own logits (depends on q_i only);
- key j: c_j = max over positions j' <= j and all features of the key logits, a
  running max. A per-key shift would reweight keys and change the kernel, so the
  causal helper puts all keys j <= i back on query i's common scale exp(-c_i) (see
  causal_linear.py `key_log_scale`). A global max over all keys, as the original
  non-causal code uses, would let future keys change past outputs through eps.
Both stabilisers are detached (constants for autograd): they cancel between numerator and
denominator up to eps, and under context parallelism the key's running max may come from
another rank, whose argmax a gradient could not reach without traffic of its own.
The projection w (m, D) is orthogonal within each block of D rows (QR of a Gaussian
matrix) and each row is rescaled to the norm of an independent Gaussian vector, so
rows are marginally Gaussian. It is drawn on the CPU in float64 from a
torch.Generator seeded by (base seed, layer index, step): every data-parallel rank
draws the identical matrix without communicating.
"""

from __future__ import annotations

import math

import torch

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    """One step of the splitmix64 mixer: a well-spread 64-bit hash of a 64-bit int."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def feature_seed_for(base_seed: int, layer_idx: int, step: int) -> int:
    """Generator seed in [0, 2^63) for one layer's draw at one step; a pure function of the three."""
    h = _splitmix64(base_seed & _MASK64)
    h = _splitmix64(h ^ (layer_idx & _MASK64))
    h = _splitmix64(h ^ (step & _MASK64))
    return h & ((1 << 63) - 1)


def draw_orthogonal_features(nb_features: int, dim: int, seed: int) -> torch.Tensor:
    """(m, D) float64 projection: blocks of D orthogonal rows, each row with a chi_D norm."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    blocks = []
    for _ in range(math.ceil(nb_features / dim)):
        gaussian = torch.randn(dim, dim, generator=gen, dtype=torch.float64)
        q, r = torch.linalg.qr(gaussian)
        q = q * torch.sign(torch.diagonal(r))  # sign fix: makes the rotation uniformly (Haar) distributed
        blocks.append(q.T)  # rows orthonormal
    directions = torch.cat(blocks, dim=0)[:nb_features]  # (m, D)
    norms = torch.randn(nb_features, dim, generator=gen, dtype=torch.float64).norm(dim=1)  # (m,)
    return directions * norms[:, None]


def favor_logits(x: torch.Tensor, projection: torch.Tensor) -> torch.Tensor:
    """w x' - |x'|^2 / 2 for x (..., T, D), projection (m, D) -> (..., T, m)."""
    x = x * x.shape[-1] ** -0.25
    return x @ projection.T - 0.5 * (x * x).sum(dim=-1, keepdim=True)


def query_features(x: torch.Tensor, projection: torch.Tensor) -> torch.Tensor:
    """phi(q) with the per-query max stabiliser: (..., T, D) -> (..., T, m), entries in (0, 1/sqrt(m)]."""
    logits = favor_logits(x, projection)
    logits = logits - logits.amax(dim=-1, keepdim=True).detach()
    return torch.exp(logits) / math.sqrt(projection.shape[0])


def key_features(x: torch.Tensor, projection: torch.Tensor, start: torch.Tensor | None = None,
                 logits: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """phi(k) / exp(c_j) and the running-max log-scale c: (B, H, T, D) -> (B, H, T, m), (B, H, T).

    start (B, H): the max over the keys before this slice (context parallelism), or None.
    logits: favor_logits(x, projection) when the caller has them already."""
    logits = favor_logits(x, projection) if logits is None else logits
    running_max = logits.amax(dim=-1).detach().cummax(dim=-1).values  # (B, H, T), non-decreasing in T
    if start is not None:
        running_max = torch.maximum(running_max, start[..., None])
    return torch.exp(logits - running_max[..., None]) / math.sqrt(projection.shape[0]), running_max
