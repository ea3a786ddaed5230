"""Decoder-only language model: embedding, pre-norm blocks, final RMSNorm, LM head.

With model.moe.num_experts > 0 the MLP of every `every_n_layers`-th block is an MoELayer
(models/moe.py); the loss then includes the routers' aux and z losses and `moe_stats()`
reports the last forward's routing.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from .attention import build_attention
from .config import AttentionConfig, ModelConfig
from .mlp import GeluMLP
from .moe import MoELayer, expert_parameters, moe_layers
from .norm import RMSNorm

# Linear layers whose output is added to the residual stream; GPT-2 scales their init
# by 1/sqrt(2 * n_layers) so the stream's variance does not grow with depth.
RESIDUAL_PROJECTIONS = ("out_proj", "down_proj")


class DecoderBlock(nn.Module):
    """x + Attn(RMSNorm(x)), then x + MLP(RMSNorm(x)); no MLP when the attention replaces it (GAU).

    The MLP is an MoELayer in the blocks that `model.moe.is_moe_layer(layer_idx)` picks.
    """

    def __init__(self, model_cfg: ModelConfig, attn_cfg: AttentionConfig, layer_idx: int):
        super().__init__()
        d = model_cfg.d_model
        self.attn_norm = RMSNorm(d, model_cfg.norm_eps)
        self.attn = build_attention(attn_cfg, d_model=d, n_heads=model_cfg.n_heads, seq_len=model_cfg.seq_len,
                                    layer_idx=layer_idx, n_layers=model_cfg.n_layers)
        if getattr(self.attn, "replaces_mlp", False):
            self.mlp_norm, self.mlp = None, None
        else:
            self.mlp_norm = RMSNorm(d, model_cfg.norm_eps)
            hidden = int(model_cfg.mlp_ratio * d)
            moe = model_cfg.moe
            self.mlp = MoELayer(d, hidden, moe) if moe.is_moe_layer(layer_idx) else GeluMLP(d, hidden)
        self.dropout = nn.Dropout(model_cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, T, C)
        x = x + self.dropout(self.attn(self.attn_norm(x)))
        if self.mlp is not None:
            x = x + self.dropout(self.mlp(self.mlp_norm(x)))
        return x


class DecoderLM(nn.Module):
    """Causal LM over token ids; see ModelConfig and AttentionConfig for the knobs.

    Positions come from RoPE inside attention; with attention.rope false, a learned
    absolute position table is added to the token embeddings instead. Dropout (if
    any) is on the embeddings and on each residual branch. Init: every Linear and
    Embedding weight ~ N(0, init_std), residual output projections ~
    N(0, init_std / sqrt(2 n_layers)), norm gains 1; it draws from torch's global
    generator, so the same torch.manual_seed gives the same weights.
    """

    def __init__(self, model_cfg: ModelConfig, attn_cfg: AttentionConfig):
        super().__init__()
        model_cfg.validate(attn_cfg)
        self.model_cfg = model_cfg
        self.attn_cfg = attn_cfg
        d, V = model_cfg.d_model, model_cfg.vocab_size
        self.tok_emb = nn.Embedding(V, d)
        self.pos_emb = None if attn_cfg.rope else nn.Embedding(model_cfg.seq_len, d)
        self.emb_dropout = nn.Dropout(model_cfg.dropout)
        self.blocks = nn.ModuleList(DecoderBlock(model_cfg, attn_cfg, i) for i in range(model_cfg.n_layers))
        self.final_norm = RMSNorm(d, model_cfg.norm_eps)
        self.lm_head = nn.Linear(d, V, bias=False)
        if model_cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.cp = None
        """With context parallelism, an object handed in (parallel/context_parallel.py ContextShard)
        that says which tokens of each sequence this rank holds and moves what attention needs."""
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        std = self.model_cfg.init_std
        residual_std = std / math.sqrt(2 * self.model_cfg.n_layers)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                is_residual = name.rsplit(".", 1)[-1] in RESIDUAL_PROJECTIONS
                nn.init.normal_(module.weight, 0.0, residual_std if is_residual else std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, 0.0, std)
            elif isinstance(module, MoELayer):  # its router is a child Linear, drawn by the branch above
                module.reset_experts(std, residual_std)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx (B, T) -> logits (B, T, V), and the mean cross-entropy (float32) when targets (B, T) are given.

        Targets equal to -100 are ignored (F.cross_entropy's ignore_index). With MoE layers the
        loss also holds their coefficient-weighted aux and z losses for this micro-batch
        (`moe_stats()` has them apart).

        With context parallelism (`self.cp` set) idx and targets are still whole sequences; the
        model keeps this rank's tokens (logits (B, T/K, V)) and the loss is the mean over them,
        which averaged over the cp ranks is the whole sequence's mean (equal token counts; with
        ignored targets the ranks' counts may differ and that average weights them equally).
        """
        if idx.dim() != 2:
            raise ValueError(f"idx must be (B, T) token ids, got shape {tuple(idx.shape)}")
        T = idx.shape[1]
        if not 1 <= T <= self.model_cfg.seq_len:
            raise ValueError(f"idx has sequence length {T}; it must be between 1 and model.seq_len="
                             f"{self.model_cfg.seq_len}")
        positions = torch.arange(T, device=idx.device)
        if self.cp is not None:  # this rank's tokens, with their places in the whole sequence
            positions = self.cp.positions(T, idx.device)
            idx = self.cp.local(idx)  # (B, T/K)
            targets = self.cp.local(targets) if targets is not None else None
        x = self.tok_emb(idx)  # (B, T, C)
        if self.pos_emb is not None:
            x = x + self.pos_emb(positions)
        x = self.emb_dropout(x)
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.final_norm(x))  # (B, T, V)
        if targets is None:
            return logits, None
        with torch.autocast(device_type=logits.device.type, enabled=False):
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))
        for layer in moe_layers(self):
            loss = loss + layer.aux_loss
        return logits, loss

    def set_step(self, step: int) -> None:
        """Tell step-dependent layers (Performer feature redraw) which optimizer step runs next."""
        for module in self.modules():
            if module is not self and callable(getattr(module, "set_step", None)):
                module.set_step(step)

    def param_groups(self, weight_decay: float) -> list[dict]:
        """[decayed, not decayed] optimizer groups covering every trainable parameter exactly once.

        Decayed: the weights of Linear layers (an untied LM head and MoE routers included) and
        the stacked MoE expert matrices. Not decayed:
        norm gains, biases, GAU's scale/offset, embeddings and the head tied to them.
        """
        embedding_ids = {id(self.tok_emb.weight)}
        if self.pos_emb is not None:
            embedding_ids.add(id(self.pos_emb.weight))
        linear_weight_ids = {id(m.weight) for m in self.modules() if isinstance(m, nn.Linear)}
        # Stacked expert matrices are Linear weights in all but module type.
        linear_weight_ids |= {id(p) for p in self.expert_parameters()}
        decay, no_decay = [], []
        for p in self.parameters():  # parameters() yields a shared (tied) tensor once
            if not p.requires_grad:
                continue
            if id(p) in linear_weight_ids and id(p) not in embedding_ids:
                decay.append(p)
            else:
                no_decay.append(p)
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count, a tied matrix once. non_embedding drops the lookup-only tables.

        Lookup-only: the position table, and the token embedding when it is *not*
        tied. A tied embedding is also the LM head's weight and does a real 2*d*V
        matmul per token, so it stays in N, as in nanoGPT; 6N then counts the head.
        """
        total = sum(p.numel() for p in self.parameters())
        if non_embedding:
            if self.pos_emb is not None:
                total -= self.pos_emb.weight.numel()
            if not self.model_cfg.tie_embeddings:
                total -= self.tok_emb.weight.numel()
        return total

    def flops_per_token(self, seq_len: int) -> float:
        """Training (forward + backward) FLOPs per token: 6 N + 3 * sum of the layers' attention forward FLOPs.

        For softmax attention this is PaLM's 6N + 12 L H Q T. With MoE, N counts the active
        parameters: each MoE layer's router plus top_k experts (nominal: dropped tokens are not
        subtracted), whatever experts this rank holds under expert parallelism.
        """
        attention = sum(block.attn.flops_per_token(seq_len) for block in self.blocks)
        n = self.num_params(non_embedding=True) - sum(p.numel() for p in self.expert_parameters())
        n += sum(layer.active_expert_params() for layer in moe_layers(self))
        return 6.0 * n + 3.0 * attention

    def expert_parameters(self) -> list[nn.Parameter]:
        """The MoE expert weights (also tagged `p._ringtrain_expert = True`): data parallelism averages
        their gradients over the ranks holding the same experts (Topology.expert_dp), the rest over all."""
        return expert_parameters(self)

    def moe_stats(self) -> dict[str, torch.Tensor]:
        """Routing of the last forward (this rank's micro-batch), as detached float32 scalars; {} if dense.

        tokens_per_expert_min/mean/max: (token, slot) assignments routed to an expert before
        dropping, min/mean/max over experts, averaged over MoE layers; dropped_frac: dropped
        assignments / all assignments, averaged over layers; aux_loss, z_loss: coefficient-weighted,
        summed over layers (what the forward added to the loss).
        """
        layers = moe_layers(self)
        if not layers:
            return {}
        out = {}
        for key in layers[0].stats:
            total = torch.stack([layer.stats[key] for layer in layers]).sum()
            out[key] = total if key in ("aux_loss", "z_loss") else total / len(layers)
        return out
