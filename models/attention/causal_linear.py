"""Causal linear attention over given feature maps, chunk-wise in O(T), and its O(T^2) reference.

Shared by linear attention (phi = elu + 1), Performer (positive random features) and
TransNormer (no denominator). With A_ij = phi(q_i) . phi(k_j) for j <= i:

    normalize=True:   o_i = sum_j A_ij v_j / (sum_j A_ij + eps)
    normalize=False:  o_i = sum_j A_ij v_j

Chunk-wise form: the sequence is cut into chunks of C tokens (the last may be
shorter; nothing is padded). Inside a chunk, A is computed as a C x C matrix under a
causal mask; across chunks, a running state S = sum phi(k_j) v_j^T (F x D) and
z = sum phi(k_j) (F) carries every earlier chunk. Time O(T (C + F) D), memory
O(C^2 + F D) per chunk; no T x T matrix is ever formed.

key_log_scale (Performer's overflow guard): phi_k may arrive divided by exp(c_j),
with c (B, H, T) non-decreasing along T. Query i then sees every key j <= i at the
common scale exp(-c_i): A_ij = phi(q_i) . phi_k_j * exp(c_j - c_i). That factor is one
scalar per query row, so it cancels between numerator and denominator (up to eps),
and it uses nothing after position i. The running state is kept at the scale of the
last key folded in and rescaled by exp(old - new) <= 1, as in online softmax.

Everything runs in float32 (float64 if any input is float64) with autocast off, so
states accumulate in full precision under bf16 autocast. The result is returned in
that compute dtype; callers cast.
"""

from __future__ import annotations

import torch


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def causal_linear_attention(
    phi_q: torch.Tensor,
    phi_k: torch.Tensor,
    v: torch.Tensor,
    chunk_size: int,
    eps: float = 1e-6,
    normalize: bool = True,
    key_log_scale: torch.Tensor | None = None,
    initial: tuple | None = None,
) -> torch.Tensor:
    """phi_q, phi_k (B, H, T, F), v (B, H, T, D), key_log_scale (B, H, T) or None -> (B, H, T, D).

    initial = (S (B, H, F, D), z (B, H, F) or None, log-scale (B, H) or None): the state of every
    token before this slice (context parallelism, see state_passing.py), at scale exp(-scale) when
    key_log_scale is given (the scale must not exceed key_log_scale[..., 0]). None: nothing before."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    dtype = _compute_dtype(phi_q, phi_k, v)
    B, H, T, F = phi_q.shape
    D = v.shape[-1]
    with torch.autocast(device_type=phi_q.device.type, enabled=False):
        q, k, v = phi_q.to(dtype), phi_k.to(dtype), v.to(dtype)
        c_all = None if key_log_scale is None else key_log_scale.to(dtype)
        C = min(chunk_size, T)
        mask = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
        state = q.new_zeros(B, H, F, D)  # sum over earlier chunks of phi(k_j) v_j^T
        norm = q.new_zeros(B, H, F)  # sum over earlier chunks of phi(k_j)
        state_scale = None if c_all is None else c_all[:, :, 0]  # (B, H) log-scale of state
        if initial is not None:
            init_state, init_norm, init_scale = initial
            state = init_state.to(dtype)
            norm = init_norm.to(dtype) if init_norm is not None else norm
            if c_all is not None and init_scale is not None:
                state_scale = init_scale.to(dtype)
        outputs = []
        # one split up front: slicing inside the loop would make each slice's backward
        # write a zero-filled full (B, H, T, F) gradient, O(T^2 / C) work in all
        chunks = zip(q.split(C, dim=2), k.split(C, dim=2), v.split(C, dim=2),
                     c_all.split(C, dim=2) if c_all is not None else [None] * len(range(0, T, C)))
        for start, (qc, kc, vc, cc) in zip(range(0, T, C), chunks):
            L = qc.shape[2]
            causal = mask[:L, :L]
            scores = qc @ kc.transpose(-1, -2)  # (B, H, L, L)
            if c_all is not None:  # cc: (B, H, L)
                # exp(c_j - c_i) <= 1 for j <= i; clamp keeps masked (j > i) entries finite.
                scores = scores * torch.exp((cc[:, :, None, :] - cc[:, :, :, None]).clamp(max=0))
                q_inter = qc * torch.exp(state_scale[:, :, None] - cc)[..., None]  # state -> scale c_i
            else:
                q_inter = qc
            scores = scores.masked_fill(~causal, 0.0)
            num = scores @ vc + q_inter @ state  # (B, H, L, D)
            if normalize:
                den = scores.sum(dim=-1) + (q_inter @ norm[..., None]).squeeze(-1)  # (B, H, L)
                outputs.append(num / (den + eps)[..., None])
            else:
                outputs.append(num)
            if start + C < T:  # fold this chunk into the running state
                if c_all is not None:
                    new_scale = cc[:, :, -1]  # (B, H): c is non-decreasing, so this is the max
                    decay = torch.exp(state_scale - new_scale)  # (B, H), <= 1
                    kc = kc * torch.exp(cc - new_scale[..., None])[..., None]
                    state = state * decay[..., None, None]
                    norm = norm * decay[..., None]
                    state_scale = new_scale
                state = state + kc.transpose(-1, -2) @ vc
                norm = norm + kc.sum(dim=2)
        return torch.cat(outputs, dim=2)


def causal_linear_attention_reference(
    phi_q: torch.Tensor,
    phi_k: torch.Tensor,
    v: torch.Tensor,
    eps: float = 1e-6,
    normalize: bool = True,
    key_log_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """The same formula with a full T x T masked matrix, in float64. For tests only."""
    q, k, v = phi_q.double(), phi_k.double(), v.double()
    T = q.shape[2]
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    scores = q @ k.transpose(-1, -2)  # (B, H, T, T)
    if key_log_scale is not None:
        c = key_log_scale.double()
        rel = torch.where(causal, c[:, :, None, :] - c[:, :, :, None], torch.zeros((), dtype=c.dtype))
        scores = scores * torch.exp(rel)
    scores = scores.masked_fill(~causal, 0.0)
    out = scores @ v
    if normalize:
        out = out / (scores.sum(dim=-1, keepdim=True) + eps)
    return out


def chunked_linear_attention_flops(seq_len: int, chunk_size: int, feature_dim: int, value_dim: int,
                                   normalize: bool = True) -> float:
    """Forward matmul FLOPs per token, per head, of `causal_linear_attention` (multiply-add = 2).

    Counts what the chunk loop multiplies: per chunk of L tokens, phi_q phi_k^T
    (2 L^2 F) and scores @ v (2 L^2 D), the inter-chunk phi_q S (2 L F D), the
    state update phi_k^T v (2 L F D, skipped for the last chunk), and when
    normalising phi_q z (2 L F). Masked entries are counted: they are computed.
    """
    C = min(chunk_size, seq_len)
    total = 0
    for start in range(0, seq_len, C):
        L = min(C, seq_len - start)
        total += 2 * L * L * (feature_dim + value_dim) + 2 * L * feature_dim * value_dim
        if normalize:
            total += 2 * L * feature_dim
        if start + C < seq_len:
            total += 2 * L * feature_dim * value_dim
    return total / seq_len
