"""Mixture-of-Experts feed-forward layer: a float32 router, capacity dropping, stacked GELU experts.

Semantics (tests/test_moe.py pins them; docs/design.md "Numerical conventions"):

- Router: logits = x W_g^T with W_g (E, d), no bias, computed in float32 (input and weight
  cast, autocast off); probs = softmax(logits). Each token picks its top_k experts by prob.
  Combine weight: top-1 uses the raw prob (Switch); top-2 renormalises the two probs to sum 1.
- Capacity per expert = ceil(top_k * N / E * capacity_factor), N = the tokens this layer is
  given (B*T of one rank's micro-batch); capacity_factor in training, eval_capacity_factor in
  eval mode; a factor <= 0 means dropless. Under expert parallelism routing and dropping happen
  on the source rank before dispatch, so capacity is per (source rank, expert) - GShard's and
  DeepSpeed's local capacity - and a local layer given one rank's tokens drops the same ones.
- Dropping: all (token, slot) assignments routed to an expert compete, first and second choices
  alike, on their raw router prob; the `capacity` highest are kept, ties going to the lower
  token index. A dropped assignment contributes zero (for that slot the token only keeps its
  residual); the other slot of a top-2 token is unaffected and keeps its renormalised weight.
- Switch aux loss = E * sum_i f_i P_i, f_i = (assignments to expert i before dropping) /
  (top_k * N) - for top-1 the fraction of tokens whose first choice is i - and P_i = the mean
  router prob of expert i. z-loss = mean over tokens of logsumexp(logits)^2. The layer adds
  aux_loss_coef * aux + z_loss_coef * z to `aux_loss` for this micro-batch; the trainer divides
  the whole loss by grad_accum, which normalises both over gradient-accumulation micro-steps.
- Experts: GELU MLPs (d -> h -> d, no bias, like GeluMLP), held stacked as w_up (E, d, h) and
  w_down (E, h, d). Kept assignments are sorted by expert so each expert runs one matmul over a
  contiguous slice of tokens; every expert runs even on zero rows, so every expert weight gets
  a gradient (zeros) each step, which bucketed gradient hooks rely on.

`shard_experts` + `dispatch` are where parallel/expert_parallel.py plugs in all-to-all dispatch:
the layer hands the dispatcher its kept rows grouped by global expert, the per-expert counts, and
a function that runs its local experts on rows grouped by local expert.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from .config import MoEConfig


@dataclass
class Routing:
    """One routing decision over N tokens and E experts (k = top_k)."""

    logits: torch.Tensor   # (N, E) float32
    probs: torch.Tensor    # (N, E) float32 softmax of logits
    expert: torch.Tensor   # (N, k) chosen experts, best first
    weight: torch.Tensor   # (N, k) float32 combine weights (differentiable)
    keep: torch.Tensor     # (N, k) bool: the assignment fits the capacity
    order: torch.Tensor    # (M,) flat ids token*k + slot of the kept assignments, grouped by expert
    counts: torch.Tensor   # (E,) kept assignments per expert (the group sizes of `order`)
    routed: torch.Tensor   # (E,) assignments per expert before dropping
    capacity: int | None   # None = dropless
    aux_loss: torch.Tensor  # Switch load-balancing loss, before its coefficient
    z_loss: torch.Tensor    # router z-loss, before its coefficient


def capacity(tokens: int, num_experts: int, top_k: int, factor: float) -> int | None:
    """ceil(top_k * tokens / num_experts * factor); None (dropless) when factor <= 0."""
    return None if factor <= 0 else math.ceil(top_k * tokens / num_experts * factor)


def route(logits: torch.Tensor, top_k: int, capacity_factor: float) -> Routing:
    """Top-k routing with capacity dropping of float32 router logits (N, E); see the module docstring."""
    logits = logits.float()
    N, E = logits.shape
    probs = logits.softmax(dim=-1)
    top_p, expert = probs.topk(top_k, dim=-1)                     # (N, k)
    weight = top_p if top_k == 1 else top_p / top_p.sum(dim=-1, keepdim=True)
    flat_expert, flat_p = expert.reshape(-1), top_p.detach().reshape(-1)
    # Flat ids are token-major, so two stable sorts give (expert asc, prob desc, token asc).
    by_prob = torch.sort(-flat_p, stable=True).indices
    order = by_prob[torch.sort(flat_expert[by_prob], stable=True).indices]
    routed = torch.bincount(flat_expert, minlength=E)
    cap = capacity(N, E, top_k, capacity_factor)
    if cap is None:
        keep_sorted = torch.ones_like(order, dtype=torch.bool)
    else:
        start = torch.cumsum(routed, 0) - routed                  # first sorted position of each expert
        rank_in_expert = torch.arange(order.numel(), device=order.device) - start[flat_expert[order]]
        keep_sorted = rank_in_expert < cap
    keep = torch.zeros(N * top_k, dtype=torch.bool, device=logits.device)
    keep[order[keep_sorted]] = True
    order = order[keep_sorted]
    counts = torch.bincount(flat_expert[order], minlength=E)
    f = routed.float() / max(N * top_k, 1)
    aux = E * (f * probs.mean(dim=0)).sum() if N else logits.new_zeros(())
    z = torch.logsumexp(logits, dim=-1).square().mean() if N else logits.new_zeros(())
    return Routing(logits, probs, expert, weight, keep.view(N, top_k), order, counts, routed, cap, aux, z)


def run_experts(x: torch.Tensor, counts: list[int], w_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """Rows of x grouped by expert (counts[e] rows for expert e) -> each group through its own GELU MLP.

    One matmul pair per expert over its contiguous slice; empty slices still run so that every
    expert's weights take part in the graph.
    """
    outs = [F.gelu(xe @ w_up[e]) @ w_down[e] for e, xe in enumerate(x.split(counts))]
    return torch.cat(outs) if outs else x.new_zeros(0, w_down.shape[-1])


class MoELayer(nn.Module):
    """Drop-in replacement for GeluMLP: (B, T, d) -> (B, T, d), with `aux_loss` and `stats` of the last call.

    Holds experts [expert_offset, expert_offset + num_local_experts) of `num_experts`; all of them
    unless expert parallelism (parallel/expert_parallel.py) kept a slice and set `dispatch`.
    """

    def __init__(self, d_model: int, hidden: int, cfg: MoEConfig, init_std: float = 0.02,
                 residual_std: float | None = None):
        super().__init__()
        cfg.validate()
        if cfg.num_experts < 1:
            raise ValueError(f"model.moe.num_experts must be >= 1 for an MoE layer, got {cfg.num_experts}")
        self.cfg = cfg
        self.num_experts, self.top_k = cfg.num_experts, cfg.top_k
        self.d_model, self.hidden = d_model, hidden
        self.gate = nn.Linear(d_model, cfg.num_experts, bias=False)
        self.w_up = nn.Parameter(torch.empty(cfg.num_experts, d_model, hidden))
        self.w_down = nn.Parameter(torch.empty(cfg.num_experts, hidden, d_model))
        self.num_local_experts, self.expert_offset = cfg.num_experts, 0
        # callable(x_sorted, counts (E,), run_local_experts) -> y_sorted in x_sorted's row order;
        # None = run all experts here. Set by `shard_experts`.
        self.dispatch = None
        self.aux_loss: torch.Tensor | None = None
        self.stats: dict[str, torch.Tensor] = {}
        self.reset_parameters(init_std, init_std if residual_std is None else residual_std)

    @torch.no_grad()
    def reset_parameters(self, std: float, residual_std: float) -> None:
        """Router and up-projections ~ N(0, std); down-projections (residual outputs) ~ N(0, residual_std)."""
        nn.init.normal_(self.gate.weight, 0.0, std)
        self.reset_experts(std, residual_std)

    @torch.no_grad()
    def reset_experts(self, std: float, residual_std: float) -> None:
        nn.init.normal_(self.w_up, 0.0, std)
        nn.init.normal_(self.w_down, 0.0, residual_std)
        mark_expert_parameters(self)

    def expert_parameters(self) -> list[nn.Parameter]:
        """The expert weights (replicated only across ranks holding the same experts); the router is not one."""
        return [self.w_up, self.w_down]

    def run_local_experts(self, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Rows grouped by local expert (counts[e] rows for local expert e) -> their expert outputs."""
        return run_experts(x, counts, self.w_up, self.w_down)

    def shard_experts(self, offset: int, count: int, dispatch) -> None:
        """Keep experts [offset, offset + count) only, and route tokens through `dispatch` (expert
        parallelism; parallel/expert_parallel.py finds layers by this method, without importing models)."""
        if self.dispatch is not None or self.num_local_experts != self.num_experts:
            raise ValueError("this MoE layer is already expert-parallel")
        for name in ("w_up", "w_down"):
            full = getattr(self, name)
            setattr(self, name, nn.Parameter(full.detach()[offset:offset + count].clone(),
                                             requires_grad=full.requires_grad))
        mark_expert_parameters(self)
        self.num_local_experts, self.expert_offset, self.dispatch = count, offset, dispatch

    def router_logits(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            return F.linear(x.float(), self.gate.weight.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        factor = self.cfg.capacity_factor if self.training else self.cfg.eval_capacity_factor
        r = route(self.router_logits(flat), self.top_k, factor)
        tokens = r.order // self.top_k
        x_sorted = flat[tokens]
        if self.dispatch is None:
            y_sorted = self.run_local_experts(x_sorted, r.counts.tolist())
        else:
            y_sorted = self.dispatch(x_sorted, r.counts, self.run_local_experts)
        w = r.weight.reshape(-1)[r.order].to(y_sorted.dtype)
        out = y_sorted.new_zeros(flat.shape[0], y_sorted.shape[-1]).index_add(0, tokens, y_sorted * w[:, None])
        aux, z = self.cfg.aux_loss_coef * r.aux_loss, self.cfg.z_loss_coef * r.z_loss
        self.aux_loss = aux + z
        routed = r.routed.float()
        self.stats = {
            "tokens_per_expert_min": routed.min(), "tokens_per_expert_mean": routed.mean(),
            "tokens_per_expert_max": routed.max(),
            "dropped_frac": routed.new_tensor(1.0 - r.order.numel() / max(r.keep.numel(), 1)),
            "aux_loss": aux.detach(), "z_loss": z.detach(),
        }
        return out.view(*shape[:-1], out.shape[-1])

    def active_expert_params(self) -> int:
        """Expert parameters one token's forward uses: top_k experts (whatever experts this rank holds)."""
        return self.top_k * 2 * self.d_model * self.hidden


def mark_expert_parameters(layer: MoELayer) -> None:
    """Tag expert weights with `_ringtrain_expert = True` (a deepcopy drops the tag; `expert_parameters`
    walks the modules instead and is the reliable way)."""
    for p in layer.expert_parameters():
        p._ringtrain_expert = True


def expert_parameters(module: nn.Module) -> list[nn.Parameter]:
    """Every expert weight of every MoE layer under `module`, in module order."""
    return [p for m in module.modules() if isinstance(m, MoELayer) for p in m.expert_parameters()]


def moe_layers(module: nn.Module) -> list[MoELayer]:
    return [m for m in module.modules() if isinstance(m, MoELayer)]
