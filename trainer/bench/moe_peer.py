"""The MoE benchmark's peer: `deepspeed.moe.layer.MoE` holding the same experts and router as a
ringtrain `MoELayer`, set up so that both route alike.

How DeepSpeed (0.19.x, sharded_moe.py top1gating / top2gating) is matched, and what still differs:
- Capacity: DeepSpeed uses ceil(S / E * cf) for top-1 and ceil(S / E * 2 cf) for top-2, S = this
  rank's tokens, then max(., min_capacity); ringtrain uses ceil(k S / E * cf). We pass
  min_capacity=0, so the capacities are equal. cf <= 0 (ringtrain's dropless) maps to drop_tokens=False.
- Which tokens are dropped: ringtrain keeps the `capacity` highest router probabilities per expert
  (first and second choices compete). DeepSpeed top-1 drops at random with Random Token Selection
  (use_rts=True, its default) or by an arbitrary top-k over a 0/1 mask; top-2 fills first choices
  before second choices in token order. We pass use_rts=False and top2_2nd_expert_sampling=False
  (deterministic second expert, as ringtrain's top-2): both are DeepSpeed's cheaper paths, so they
  can only help it. Gates: top-1 uses the raw probability, top-2 renormalises the pair, in both.
- Work: DeepSpeed pads every expert to `capacity` rows: each of its 4 all-to-alls (2 forward,
  2 backward) moves E*C*d values and every expert runs C rows whatever its load. ringtrain sends
  only the kept rows (split sizes from a small all-to-all of per-expert counts) and runs each local
  expert once over exactly its rows. ringtrain also computes the router z-loss; DeepSpeed does not.
- Experts: DeepSpeed's expert is Linear(d, h) -> GELU (erf) -> Linear(h, d), no bias: the same MLP
  as ringtrain's stacked w_up / w_down. DeepSpeed's all-to-all is torch.distributed's (gloo on CPU).
On a CPU machine DeepSpeed is told DS_ACCELERATOR=cpu; it runs on gloo once torch.distributed is up.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os

import torch
from torch import nn

from models.moe import MoELayer


def deepspeed_layer(full: MoELayer, capacity_factor: float, ctx) -> nn.Module:
    """deepspeed.moe.layer.MoE with this rank's slice of `full`'s experts and its router
    (ep_size = the world size)."""
    if ctx.device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before the first deepspeed import
    import deepspeed
    from deepspeed.moe.layer import MoE

    deepspeed.utils.logger.setLevel(logging.WARNING)
    # torch.distributed is already up: DeepSpeed only wraps it (TorchBackend over gloo / nccl).
    deepspeed.init_distributed(dist_backend=ctx.backend, verbose=False)
    d, h, E = full.d_model, full.hidden, full.num_experts
    expert = nn.Sequential(nn.Linear(d, h, bias=False), nn.GELU(), nn.Linear(h, d, bias=False))
    moe = MoE(d, expert, num_experts=E, ep_size=ctx.world_size, k=full.top_k,
              capacity_factor=capacity_factor if capacity_factor > 0 else 1.0,
              eval_capacity_factor=float(E), min_capacity=0, drop_tokens=capacity_factor > 0,
              use_residual=False, use_rts=False, top2_2nd_expert_sampling=False)
    with contextlib.redirect_stdout(io.StringIO()):  # it prints "creating a new group" per rank
        moe.set_deepspeed_parallelism()
    n_local, inner = E // ctx.world_size, moe.deepspeed_moe
    with torch.no_grad():  # DeepSpeed's ep rank r holds experts [r*n_local, (r+1)*n_local), as ringtrain
        inner.gate.wg.weight.copy_(full.gate.weight)
        for j, ex in enumerate(inner.experts.deepspeed_experts):
            ex[0].weight.copy_(full.w_up[ctx.rank * n_local + j].T)
            ex[2].weight.copy_(full.w_down[ctx.rank * n_local + j].T)
    return moe.to(ctx.device)


def deepspeed_forward(moe: nn.Module, aux_loss_coef: float):
    """x -> (y, aux loss): DeepSpeed's l_aux comes without its coefficient."""
    def forward(x):
        y, l_aux, _ = moe(x)
        return y, aux_loss_coef * l_aux
    return forward


def deepspeed_bytes_per_step(num_experts: int, capacity: int | None, d_model: int, world: int) -> int | None:
    """What one rank sends per fwd+bwd step: 4 all-to-alls of (E, C, d) float32, (W-1)/W of each
    leaving the rank; None when dropless (C varies)."""
    return 4 * num_experts * capacity * d_model * 4 * (world - 1) // world if capacity else None


def deepspeed_dropped(moe: nn.Module, capacity: int | None, assignments: int) -> float:
    """Dropped (token, slot) fraction of the last step: every expert keeps min(routed, capacity)."""
    counts = moe.deepspeed_moe.exp_counts
    return 0.0 if capacity is None else 1.0 - float(counts.clamp(max=capacity).sum()) / assignments
