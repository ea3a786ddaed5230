"""Context parallelism: every sequence is split over the K ranks of a cp group.

`apply_context_parallel(model, shard)` hands one `ContextShard` to the model and to every
module that declares a `cp` attribute (the decoder and its attention layers). The model is
then called with whole sequences (B, T) as before; it keeps only this rank's tokens
(`shard.local`), gives RoPE and the position table their global positions
(`shard.positions`), and its attention layers reach the tokens held elsewhere through the
shard: softmax by ring attention (`shard.attention`), the linear-time kinds by passing
their key-value states (`shard.earlier_sum`, differentiable). Everything else in a block
(norms, MLP, the LM head, the loss) acts token by token and needs no traffic.

Layouts (`spans`), for T tokens:

    contiguous  rank c holds tokens [c T/K, (c+1) T/K): the linear-time kinds, whose state
                passing needs every earlier token on an earlier rank
    balanced    rank c holds chunks c and 2K-1-c of 2K equal chunks: causal softmax, where a
                contiguous split would leave rank 0 one K-th of the work of rank K-1

The loss: each rank's is the mean over its own T/K tokens of every sequence; the K ranks
hold equal numbers of tokens, so the mean of their losses is the whole sequence's mean, and
averaging gradients over data parallel x cp (which DDP and every ZeRO stage already do over
all ranks: parameters are replicated over cp) gives the gradient of that mean.

All cp traffic goes through one Communicator (`shard.comm`), so its `stats` are the cp bytes
and wait seconds that the trainer reports per step.
"""

from __future__ import annotations

import torch
from torch import nn

from .collectives import Communicator

LAYOUTS = ("contiguous", "balanced")
SOFTMAX_METHODS = ("ring", "allgather")


def check_context_parallel(*, cp_size: int, seq_len: int, kind: str, chunk_size: int, block_size: int,
                           diag_layers: int) -> None:
    """Config-time check of a cp layout against the model: ValueError naming the keys and values.

    Softmax needs 2 cp_size equal chunks; GAU's chunks (its math changes at chunk boundaries) and
    TransNormer's DiagAttention blocks must not straddle two ranks; the other kinds only need equal
    slices (their chunking is an evaluation order, not part of the formula)."""
    if cp_size < 1:
        raise ValueError(f"parallel.cp_size must be >= 1, got {cp_size}")
    if cp_size == 1:
        return
    if kind == "softmax":
        if seq_len % (2 * cp_size):
            raise ValueError(f"model.seq_len={seq_len} must be divisible by 2 x parallel.cp_size "
                             f"({2 * cp_size}) for attention=softmax (each cp rank holds two of 2 x cp_size equal chunks)")
        return
    if seq_len % cp_size:
        raise ValueError(f"model.seq_len={seq_len} must be divisible by parallel.cp_size={cp_size}")
    local = seq_len // cp_size
    if kind == "gau" and local % chunk_size:
        raise ValueError(f"model.seq_len={seq_len} must be divisible by parallel.cp_size x attention.chunk_size "
                         f"({cp_size} x {chunk_size}) for attention=gau (a GAU chunk cannot straddle two cp ranks)")
    if kind == "transnormer" and diag_layers != 0 and local % block_size:
        raise ValueError(f"model.seq_len={seq_len} must be divisible by parallel.cp_size x attention.block_size "
                         f"({cp_size} x {block_size}) for attention=transnormer with DiagAttention layers "
                         "(a block cannot straddle two cp ranks; attention.diag_layers=0 has none)")


class _EarlierSum(torch.autograd.Function):
    """Rank c's sum over ranks r < c of w_r x_r (w (K, ...) given per rank, no gradient; zeros on
    rank 0). Forward: one all-gather. Backward: rank r's x_r was used by every later rank c with
    weight w_r(c), so each rank puts g_c w_r(c) in slot r < c and one reduce-scatter sums the slots.
    Every rank's output is in its graph (rank 0's zeros too), so every rank joins the backward's
    collective."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weights: torch.Tensor, comm: Communicator) -> torch.Tensor:
        ctx.comm, c = comm, comm.rank
        x = x.contiguous()
        gathered = x.new_empty((comm.world_size, *x.shape))
        comm.all_gather(gathered, x, tag="cp state")
        mask = (torch.arange(comm.world_size, device=x.device) < c).to(x.dtype)
        w = weights * mask.reshape(-1, *([1] * (weights.dim() - 1)))
        ctx.save_for_backward(w)
        return (gathered * w).sum(dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (w,) = ctx.saved_tensors
        slots = (grad.unsqueeze(0) * w).contiguous()  # (K, ...): my gradient for each earlier rank's x
        mine = grad.new_empty(grad.shape)
        ctx.comm.reduce_scatter(mine, slots, op="sum", tag="cp state grad")
        return mine, None, None


class ContextShard:
    """This rank's part of every sequence in a cp group of `comm.world_size` ranks, and the
    group's traffic. Built by `apply_context_parallel`'s caller from the mesh's cp group."""

    def __init__(self, comm: Communicator, *, layout: str, softmax_method: str = "ring"):
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {list(LAYOUTS)}, got {layout!r}")
        if softmax_method not in SOFTMAX_METHODS:
            raise ValueError(f"parallel.cp_softmax must be one of {list(SOFTMAX_METHODS)}, got {softmax_method!r}")
        self.comm, self.layout, self.softmax_method = comm, layout, softmax_method
        self.size, self.rank = comm.world_size, comm.rank
        self._positions: dict[tuple[int, torch.device], torch.Tensor] = {}

    @property
    def stats(self):
        return self.comm.stats

    def spans(self, seq_len: int) -> list[tuple[int, int]]:
        """The global token ranges [start, end) this rank holds, in the order it holds them."""
        K, c = self.size, self.rank
        parts = 2 * K if self.layout == "balanced" else K
        if seq_len % parts:
            raise ValueError(f"a sequence of {seq_len} tokens does not split into {parts} equal parts "
                             f"({self.layout} layout over {K} cp ranks)")
        n = seq_len // parts
        chunks = (c, 2 * K - 1 - c) if self.layout == "balanced" else (c,)
        return [(i * n, (i + 1) * n) for i in chunks]

    def local(self, t: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's tokens of whole sequences `t` (the time axis is `dim`)."""
        return torch.cat([t.narrow(dim, s, e - s) for s, e in self.spans(t.shape[dim])], dim=dim)

    def positions(self, seq_len: int, device) -> torch.Tensor:
        """(seq_len / K,) int64: the global position of each token this rank holds."""
        key = (seq_len, torch.device(device))
        if key not in self._positions:
            self._positions[key] = torch.cat([torch.arange(s, e, device=device) for s, e in self.spans(seq_len)])
        return self._positions[key]

    @torch.no_grad()
    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """(K, *x.shape): every cp rank's x in rank order, without gradient (Performer's maxima)."""
        if self.size == 1:
            return x.unsqueeze(0)
        out = x.new_empty((self.size, *x.shape))
        self.comm.all_gather(out, x.contiguous(), tag="cp max")
        return out

    def earlier_sum(self, x: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        """sum over the cp ranks r before this one of weights[r] * x_r (weights (K, ...) broadcasting
        against x, no gradient; None = 1): zeros on the first rank. Differentiable (_EarlierSum)."""
        if weights is None:
            weights = torch.ones((self.size,) + (1,) * x.dim(), dtype=x.dtype, device=x.device)
        if self.size == 1:
            return torch.zeros_like(x)
        return _EarlierSum.apply(x, weights.to(x.dtype), self.comm)

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None
                  ) -> torch.Tensor:
        """Causal softmax attention of this rank's queries over the whole sequence's keys:
        q, k, v (B, H, T/K, D) in the balanced layout -> (B, H, T/K, D)."""
        from .ring_attention import allgather_attention, ring_attention

        if self.softmax_method == "ring":
            return ring_attention(q, k, v, self.comm.transport, scale=scale)
        return allgather_attention(q, k, v, self.comm, scale=scale)

    def describe(self) -> str:
        order = "chunks c and 2K-1-c" if self.layout == "balanced" else "one contiguous slice per rank"
        return f"cp {self.size} ({self.layout}: {order})"


def apply_context_parallel(model: nn.Module, shard: ContextShard) -> None:
    """Hands `shard` to every module of `model` that declares a `cp` attribute (in place)."""
    holders = [m for m in model.modules() if hasattr(m, "cp")]
    if not holders:
        raise ValueError(f"{type(model).__name__} has no module that takes context parallelism")
    for m in holders:
        m.cp = shard
