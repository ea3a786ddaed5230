"""Model and attention configuration: plain dataclasses, checked by `validate()`.

Fields are int/float/bool/str, a `Literal` of strings, or a nested config dataclass
(`ModelConfig.moe`, so the command line says `model.moe.num_experts=8`). OmegaConf 2.3 itself rejects
`Literal` annotations; Hydra gets a mirror with each `Literal` relaxed to `str`
(trainer/structured.py), and `validate()` enforces the choices here as well, so a
config built in plain Python is checked the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

AttentionKind = Literal["softmax", "linear", "performer", "gau", "transnormer"]
ATTENTION_KINDS: tuple[str, ...] = get_args(AttentionKind)


def _require(ok: bool, key: str, rule: str, value) -> None:
    """Raise ValueError('<key> must <rule>, got <value>') unless ok."""
    if not ok:
        raise ValueError(f"{key} must {rule}, got {value!r}")


@dataclass
class AttentionConfig:
    """Which token-mixing layer the decoder uses, and that layer's own settings."""

    kind: AttentionKind = "softmax"
    """Mixing layer: softmax | linear | performer | gau | transnormer."""
    chunk_size: int = 64
    """Chunk length of the chunk-wise causal forms (linear, performer, transnormer, gau)."""
    nb_features: int = 256
    """Performer: number m of positive random features."""
    redraw_interval: int = 1000
    """Performer: redraw the random features every N optimizer steps; 0 = never."""
    feature_seed: int = 0
    """Performer: base seed; features come from (feature_seed, layer index, step)."""
    shared_dim: int = 128
    """GAU: dimension s of the shared representation Z that Q and K are made from."""
    expansion: int = 2
    """GAU: U and V have e = expansion * d_model channels."""
    rope: bool = True
    """Rotary position embedding on queries and keys (a learned absolute table if false)."""
    rope_theta: float = 10000.0
    """RoPE base theta."""
    eps: float = 1e-6
    """Denominator epsilon of linear/performer attention; RMS epsilon of TransNormer's norm."""
    diag_layers: int = -1
    """TransNormer: the lowest N blocks use DiagAttention (block softmax), the others NormAttention;
    -1 = the paper's split, the lower half (model.n_layers // 2); 0 = NormAttention everywhere."""
    block_size: int = 64
    """TransNormer's DiagAttention: tokens per non-overlapping attention block."""

    def diag_layer_count(self, n_layers: int) -> int:
        """How many of n_layers blocks use DiagAttention (transnormer only)."""
        if self.kind != "transnormer":
            return 0
        return n_layers // 2 if self.diag_layers == -1 else min(self.diag_layers, n_layers)

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        _require(self.kind in ATTENTION_KINDS, "attention.kind", f"be one of {list(ATTENTION_KINDS)}", self.kind)
        _require(self.chunk_size >= 1, "attention.chunk_size", "be >= 1", self.chunk_size)
        _require(self.nb_features >= 1, "attention.nb_features", "be >= 1", self.nb_features)
        _require(self.redraw_interval >= 0, "attention.redraw_interval", "be >= 0 (0 = never)", self.redraw_interval)
        _require(self.shared_dim >= 1, "attention.shared_dim", "be >= 1", self.shared_dim)
        _require(self.expansion >= 1, "attention.expansion", "be >= 1", self.expansion)
        _require(self.rope_theta > 0, "attention.rope_theta", "be > 0", self.rope_theta)
        _require(self.eps > 0, "attention.eps", "be > 0", self.eps)
        _require(self.diag_layers >= -1, "attention.diag_layers", "be >= 0, or -1 (the lower half)",
                 self.diag_layers)
        _require(self.block_size >= 1, "attention.block_size", "be >= 1", self.block_size)
        if self.kind == "gau" and self.rope:
            # RoPE rotates pairs of channels, and GAU applies it to the s-dim Q and K.
            _require(self.shared_dim % 2 == 0, "attention.shared_dim", "be even when attention.rope is true",
                     self.shared_dim)


@dataclass
class MoEConfig:
    """Mixture-of-Experts feed-forward layers (models/moe.py); num_experts = 0 keeps the model dense.

    An expert is a GELU MLP of the dense model's shape: hidden width int(model.mlp_ratio * d_model),
    so top-1 MoE has the dense model's active parameters per token (plus the router).
    """

    num_experts: int = 0
    """Experts per MoE layer; 0 = dense model (no MoE)."""
    top_k: int = 1
    """Experts per token: 1 (Switch) or 2 (GShard-style, the two weights renormalised to sum 1)."""
    capacity_factor: float = 1.25
    """Training capacity per expert = ceil(top_k * tokens / num_experts * factor); <= 0 = dropless."""
    eval_capacity_factor: float = 2.0
    """The same, in eval mode (model.eval()); <= 0 = dropless."""
    every_n_layers: int = 1
    """Block i (0-based) is MoE when (i + 1) % every_n_layers == 0: 1 = every block, 2 = blocks 1, 3, ..."""
    aux_loss_coef: float = 0.01
    """Coefficient of the Switch load-balancing loss E * sum_i f_i P_i."""
    z_loss_coef: float = 0.001
    """Coefficient of the router z-loss mean(logsumexp(logits)^2)."""

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        _require(self.num_experts >= 0, "model.moe.num_experts", "be >= 0 (0 = dense)", self.num_experts)
        _require(self.top_k in (1, 2), "model.moe.top_k", "be 1 or 2", self.top_k)
        if self.num_experts > 0:
            _require(self.top_k <= self.num_experts, "model.moe.top_k",
                     f"be <= model.moe.num_experts={self.num_experts}", self.top_k)
        _require(self.every_n_layers >= 1, "model.moe.every_n_layers", "be >= 1", self.every_n_layers)
        _require(self.aux_loss_coef >= 0, "model.moe.aux_loss_coef", "be >= 0", self.aux_loss_coef)
        _require(self.z_loss_coef >= 0, "model.moe.z_loss_coef", "be >= 0", self.z_loss_coef)

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Whether block `layer_idx` (0-based) gets an MoE layer instead of the dense MLP."""
        return self.num_experts > 0 and (layer_idx + 1) % self.every_n_layers == 0


@dataclass
class ModelConfig:
    """Shape and initialisation of the decoder-only language model."""

    vocab_size: int = 256
    """Number of token ids (256 = bytes)."""
    seq_len: int = 256
    """Maximum context length; longer inputs are rejected."""
    d_model: int = 256
    """Residual stream width."""
    n_layers: int = 4
    """Number of decoder blocks."""
    n_heads: int = 4
    """Attention heads (GAU is single-headed and ignores this)."""
    mlp_ratio: float = 4.0
    """MLP hidden width = int(mlp_ratio * d_model)."""
    tie_embeddings: bool = True
    """Share the token embedding matrix with the LM head."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    dropout: float = 0.0
    """Dropout on the embeddings and on each residual branch."""
    init_std: float = 0.02
    """Std of the normal init; residual output projections use init_std / sqrt(2 * n_layers)."""
    moe: MoEConfig = field(default_factory=MoEConfig)
    """Mixture-of-Experts settings (model.moe.*); the default is a dense model."""

    def __post_init__(self):
        # ModelConfig(**dataclasses.asdict(cfg)) (a saved config) hands `moe` over as a dict.
        if isinstance(self.moe, dict):
            self.moe = MoEConfig(**self.moe)

    def validate(self, attention: AttentionConfig | None = None) -> None:
        """Raise ValueError naming the first bad field; with `attention`, also check the pair."""
        _require(self.vocab_size >= 1, "model.vocab_size", "be >= 1", self.vocab_size)
        _require(self.seq_len >= 1, "model.seq_len", "be >= 1", self.seq_len)
        _require(self.d_model >= 1, "model.d_model", "be >= 1", self.d_model)
        _require(self.n_layers >= 1, "model.n_layers", "be >= 1", self.n_layers)
        _require(self.n_heads >= 1, "model.n_heads", "be >= 1", self.n_heads)
        _require(self.d_model % self.n_heads == 0, "model.d_model",
                 f"be divisible by model.n_heads={self.n_heads}", self.d_model)
        _require(self.mlp_ratio > 0 and int(self.mlp_ratio * self.d_model) >= 1, "model.mlp_ratio",
                 "be > 0 and give an MLP width int(mlp_ratio * d_model) >= 1", self.mlp_ratio)
        _require(self.norm_eps > 0, "model.norm_eps", "be > 0", self.norm_eps)
        _require(0.0 <= self.dropout < 1.0, "model.dropout", "be in [0, 1)", self.dropout)
        _require(self.init_std > 0, "model.init_std", "be > 0", self.init_std)
        self.moe.validate()
        if self.moe.num_experts > 0:
            _require(self.moe.every_n_layers <= self.n_layers, "model.moe.every_n_layers",
                     f"be <= model.n_layers={self.n_layers} (otherwise no block is MoE)", self.moe.every_n_layers)
        if attention is None:
            return
        attention.validate()
        if attention.rope and attention.kind != "gau":
            head_dim = self.d_model // self.n_heads
            _require(head_dim % 2 == 0, "model.n_heads",
                     f"give an even head dim d_model/n_heads for RoPE (head dim {head_dim})", self.n_heads)
        if attention.kind == "gau":
            # GAU stands in for both attention and MLP, so there is no MLP to turn into experts.
            _require(self.moe.num_experts == 0, "model.moe.num_experts", "be 0 with attention.kind=gau (no MLP)",
                     self.moe.num_experts)
