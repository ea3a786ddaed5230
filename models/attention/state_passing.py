"""Context parallelism for the linear-time kinds: the states of earlier ranks as an initial state.

Causal linear attention only needs, from the tokens before this rank's slice, their sum
S = sum_j phi(k_j) v_j^T (and z = sum_j phi(k_j) where it normalises). So each rank folds its
slice into a local state, the cp group exchanges the states, and rank c starts its chunk loop
from the sum over ranks r < c (LASP-2: one all-gather of per-rank states and a prefix sum).
LASP-1 passes the running state round a ring instead: K-1 hops that depend on each other, so
rank K-1 waits for every predecessor in turn; the all-gather is one collective with no such
chain, for the same order of bytes, and K states of a few hundred KiB fit on any rank. The
all-gather is differentiable (its backward reduce-scatters the state gradients back to the
ranks that made them), so the gradients of earlier ranks' keys and values come home.

Bytes one rank sends per layer per micro-step with the ring all-gather and reduce-scatter:
2 (K-1) x the state's bytes, whatever T (`state_bytes`). The shard object (`cp`) is handed in
by parallel/context_parallel.py; these functions only call its `rank` and `earlier_sum`.
"""

from __future__ import annotations

import torch


def local_state(phi_k: torch.Tensor, v: torch.Tensor, key_log_scale: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """This slice's S (B, H, F, D) and z (B, H, F), in phi_k's dtype.

    With key_log_scale c (Performer: phi_k arrives divided by exp(c_j)), both are at the scale of
    the slice's last key: S = sum_j phi_k_j exp(c_j - c_last) v_j^T, as causal_linear_attention
    keeps its running state."""
    if key_log_scale is not None:
        phi_k = phi_k * torch.exp(key_log_scale - key_log_scale[..., -1:])[..., None]
    return phi_k.transpose(-1, -2) @ v, phi_k.sum(dim=-2)


def earlier_sum(cp, packed: torch.Tensor, log_scales: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The sum over the cp ranks before this one of `packed` (each rank's state, any shape;
    zeros on the first rank, which starts from nothing), and the log-scale it is at.

    log_scales (K, ...) (Performer, no gradient): rank r's state is at scale exp(-m_r); the sum is
    taken at M = max_{r < c} m_r, each state rescaled by exp(m_r - M) <= 1, and M is returned
    (None on the first rank: its caller keeps its own first key's scale)."""
    c = cp.rank
    if log_scales is None:
        return cp.earlier_sum(packed), None
    top = log_scales[:c].amax(dim=0) if c > 0 else None  # (B, H)
    # used for r < c only, where m_r <= M; the clamp keeps the unused slots (later ranks, whose
    # maxima may lie far above) from overflowing to inf, which the mask's 0 would turn into nan
    weights = torch.exp((log_scales - (top if top is not None else log_scales[0])).clamp(max=0))  # (K, B, H)
    weights = weights.reshape(*weights.shape, *([1] * (packed.dim() - weights.dim() + 1)))
    return cp.earlier_sum(packed, weights), top


def pack(state: torch.Tensor, norm: torch.Tensor | None) -> torch.Tensor:
    """(B, H, F, D) and (B, H, F) -> (B, H, F, D + 1): one tensor, one all-gather."""
    return state if norm is None else torch.cat((state, norm[..., None]), dim=-1)


def unpack(packed: torch.Tensor, normalize: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    return (packed[..., :-1], packed[..., -1]) if normalize else (packed, None)


def state_bytes(batch: int, heads: int, feature_dim: int, value_dim: int, *, normalize: bool, cp_size: int,
                dtype_bytes: int = 4) -> int:
    """Bytes one rank sends per layer per forward + backward: 2 (K-1) B H F (D + normalize) b."""
    return 2 * (cp_size - 1) * batch * heads * feature_dim * (value_dim + int(normalize)) * dtype_bytes


def initial_state(cp, phi_k: torch.Tensor, v: torch.Tensor, *, normalize: bool) -> tuple:
    """causal_linear_attention's `initial` for this rank: the earlier ranks' (S, z) in >= float32,
    autocast off (states accumulate in full precision); zeros on the first rank (still passed, so
    every rank's backward joins the state gradients' collective)."""
    dtype = torch.float64 if torch.float64 in (phi_k.dtype, v.dtype) else torch.float32
    with torch.autocast(device_type=v.device.type, enabled=False):
        state, norm = local_state(phi_k.to(dtype), v.to(dtype))
        earlier, _ = earlier_sum(cp, pack(state, norm if normalize else None))
        s0, z0 = unpack(earlier, normalize)
        return s0, z0, None
