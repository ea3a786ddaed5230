"""Causal Performer attention: FAVOR+ random features through the chunk-wise linear-attention helper."""

from __future__ import annotations

import torch

from .causal_linear import causal_linear_attention, chunked_linear_attention_flops
from .heads import MultiHeadAttentionBase, merge_heads
from .random_features import draw_orthogonal_features, favor_logits, feature_seed_for, key_features, query_features
from .state_passing import earlier_sum, local_state, pack, unpack


class PerformerAttention(MultiHeadAttentionBase):
    """o_i = phi(q_i) S_i / (phi(q_i) z_i + eps) with FAVOR+ features (see random_features.py).

    Approximates causal softmax attention softmax(q k^T / sqrt(D)) v with m random
    features shared by all heads of the layer. RoPE placement (pinned): q and k are
    rotated *before* the feature map, so the estimate is of RoPE softmax attention
    exp(R_i q . R_j k / sqrt(D)). Feature math runs in float32 (float64 for float64
    inputs) with autocast off.

    `projection` is a persistent buffer, so checkpoints carry the current draw.
    `set_step(step)` redraws when redraw_interval > 0 and step % redraw_interval == 0,
    from the seed feature_seed_for(feature_seed, layer_idx, step); construction draws
    with step 0.

    Context parallelism (`self.cp`, contiguous slices): rank c's key running max starts from the
    max over the earlier ranks' keys (a small no-gradient all-gather of each rank's max), and it
    starts its chunk loop from the earlier ranks' S and z, each rescaled from its own last running
    max to the common one (state_passing.py): exactly the one-rank formula.
    """

    def __init__(self, d_model: int, n_heads: int, *, nb_features: int = 256, redraw_interval: int = 1000,
                 feature_seed: int = 0, layer_idx: int = 0, chunk_size: int = 64, eps: float = 1e-6,
                 rope: bool = True, rope_theta: float = 10000.0):
        super().__init__(d_model, n_heads, rope=rope, rope_theta=rope_theta)
        self.nb_features = nb_features
        self.redraw_interval = redraw_interval
        self.feature_seed = feature_seed
        self.layer_idx = layer_idx
        self.chunk_size = chunk_size
        self.eps = eps
        projection = draw_orthogonal_features(nb_features, self.head_dim, feature_seed_for(feature_seed, layer_idx, 0))
        self.register_buffer("projection", projection.float(), persistent=True)  # (m, D)

    @torch.no_grad()
    def redraw(self, step: int) -> None:
        """Replace the projection with the draw for (feature_seed, layer_idx, step), in place."""
        seed = feature_seed_for(self.feature_seed, self.layer_idx, step)
        self.projection.copy_(draw_orthogonal_features(self.nb_features, self.head_dim, seed))

    def set_step(self, step: int) -> None:
        """Called once per optimizer step with the step about to run; redraws on the interval."""
        if self.redraw_interval > 0 and step % self.redraw_interval == 0:
            self.redraw(step)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, T, C)
        q, k, v = self.project_qkv(x)  # (B, H, T, D) each
        dtype = torch.promote_types(q.dtype, torch.float32)
        with torch.autocast(device_type=x.device.type, enabled=False):
            w = self.projection.to(dtype)  # (m, D)
            phi_q = query_features(q.to(dtype), w)  # (B, H, T, m)
            if self.cp is None:
                phi_k, key_scale = key_features(k.to(dtype), w)  # (B, H, T, m), (B, H, T)
                initial = None
            else:
                phi_k, key_scale, initial = self._with_earlier_ranks(k.to(dtype), v.to(dtype), w)
            out = causal_linear_attention(phi_q, phi_k, v, self.chunk_size, self.eps, key_log_scale=key_scale,
                                          initial=initial)
        return self.out_proj(merge_heads(out.to(v.dtype)))

    def _with_earlier_ranks(self, k: torch.Tensor, v: torch.Tensor, w: torch.Tensor):
        """Key features on the running max of the whole sequence so far, and the earlier ranks' state."""
        cp = self.cp
        logits = favor_logits(k, w)  # (B, H, T, m)
        with torch.no_grad():  # the stabiliser is a constant (see random_features.py)
            local_max = logits.amax(dim=(-1, -2))  # (B, H)
            maxima = cp.all_gather(local_max)  # (K, B, H)
            ends = maxima.cummax(dim=0).values  # (K, B, H): rank r's running max at its last key
        start = ends[cp.rank - 1] if cp.rank > 0 else None
        phi_k, key_scale = key_features(k, w, start, logits=logits)
        state, norm = local_state(phi_k, v, key_scale)  # at scale exp(-ends[rank])
        earlier, top = earlier_sum(cp, pack(state, norm), ends)
        initial = (*unpack(earlier, True), top if top is not None else key_scale[..., 0])
        return phi_k, key_scale, initial

    def flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs per token: q and k feature projections (2 * 2 D m per head) plus the chunk-wise mixing."""
        per_head = 4 * self.head_dim * self.nb_features + chunked_linear_attention_flops(
            seq_len, self.chunk_size, self.nb_features, self.head_dim)
        return self.n_heads * per_head

    def extra_repr(self) -> str:
        return (f"nb_features={self.nb_features}, redraw_interval={self.redraw_interval}, "
                f"feature_seed={self.feature_seed}, layer_idx={self.layer_idx}")
