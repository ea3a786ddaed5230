"""Data parallelism: every rank holds the whole model, gradients are averaged in buckets.

How a step's gradients travel (the flat-parameter layer, parallel/flat_model.py):
- At wrap time the parameters are packed, in reverse registration order (roughly the order
  backward produces their gradients), into flat gradient buckets of `bucket_mb` (the first
  capped at `first_bucket_mb`, so communication starts early), one kind per (dtype, device).
  Each parameter's `.grad` is a view into its bucket, so autograd accumulates straight into
  the buffer that is sent: no copies.
- A post-accumulate-grad hook counts a bucket's parameters as backward finishes them; once
  the bucket is complete its all-reduce (average, with the chosen collective algorithm) is
  queued on the Communicator's background thread and backward keeps computing. Buckets are
  launched in index order, so every rank issues the same collectives in the same order.
- `no_sync()` (gradient-accumulation micro-steps): gradients accumulate in the buckets and
  nothing is sent. `finish_gradient_sync()` waits for every bucket; a parameter that got no
  gradient is an error naming it, unless `find_unused_parameters=True` (its slot, zero or
  accumulated, is averaged like any other).

Mixed precision (`param_dtype` half, see parallel/precision.py): parameters are cast to half
and a float32 master copy of each is what the optimizer updates. Buckets hold the
communication dtype (`reduce_dtype`, float32 by default); when it differs from the
parameters', the hook adds each half gradient into its slot and drops it. With float32
buckets the masters' `.grad` are bucket views; with half buckets float32 copies made after
the reduction. After a step the half parameters are refreshed from the masters.

Expert parallelism: expert weights live in buckets of their own, reduced over the ranks
holding the same experts (`comms.expert_dp`), pre-scaled by 1 / world and summed.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .collectives import Communicator
from .flat_model import FlatParamModel, find_expert_parameters, optimizer_state_bytes
from .flat_params import FlatUnit, plan_buckets
from .grad_sync import GradSync
from .mesh import Comms


class DataParallel(FlatParamModel):
    """Wraps `module`; see the module docstring. Build with `apply_ddp`."""

    def __init__(self, module: nn.Module, comms: Comms, *, param_groups: list[dict] | None = None,
                 bucket_mb: float = 25.0, first_bucket_mb: float = 1.0, find_unused_parameters: bool = False,
                 param_dtype: torch.dtype | None = None, reduce_dtype: torch.dtype | None = None):
        super().__init__(module, comms, param_groups)
        if bucket_mb <= 0 or first_bucket_mb <= 0:
            raise ValueError(f"bucket_mb and first_bucket_mb must be > 0, got {bucket_mb}, {first_bucket_mb}")
        params = [p for p in module.parameters() if p.requires_grad]
        # float32 masters of half parameters, made before the cast so they are exact
        self.master_of: dict[int, nn.Parameter] = {}
        if param_dtype is not None and any(p.dtype != param_dtype for p in params):
            with torch.no_grad():
                for p in params:
                    self.master_of[id(p)] = nn.Parameter(p.detach().float().clone())
                    p.data = p.data.to(param_dtype)
        groups = plan_buckets(list(reversed(params)), int(bucket_mb * 2**20), int(first_bucket_mb * 2**20),
                              reduce_dtype, self.expert_ids)
        slot_of: dict[int, tuple[FlatUnit, int]] = {}
        for group in groups:
            expert = id(group[0]) in self.expert_ids
            unit = FlatUnit(len(self.units), group, self.unit_comm(expert), reduce_dtype or group[0].dtype,
                            sharded=False, expert=expert, world_size=self.comm.world_size)
            unit.make_grad_buffer(whole=True)
            self.units.append(unit)
            slot_of.update({id(p): (unit, i) for i, p in enumerate(group)})
        for p in params:  # the optimizer sees parameters (or masters) in module order
            unit, i = slot_of[id(p)]
            norm_group = self.comms.ep if unit.expert else None  # expert slices differ across the ep group
            self._add_optimized(self.master_of.get(id(p), p), unit.grad_view(i), unit, i, norm_group)
        self._attach_optimized_grads()
        self.grad_sync = GradSync(self.units, self.names, in_order=True, allow_unused=find_unused_parameters)

    @torch.no_grad()
    def after_step(self) -> None:
        """With masters, the half parameters are refreshed from them."""
        if self.master_of:
            params = [p for u in self.units for p in u.params]
            torch._foreach_copy_(params, [self.master_of[id(p)] for p in params])

    def master_values(self) -> dict[int, torch.Tensor]:
        return {id(p): self.master_of.get(id(p), p).detach() for p in self.module.parameters()}

    # -- optimizer state for torch.distributed.checkpoint ------------------------
    def optimizer_state(self, materialize: bool = False) -> dict[str, torch.Tensor]:
        """The optimizer's state tensors keyed by parameter name (replicated on every rank, so a
        checkpoint loads at any world size); expert slices' keys name their ep rank. With
        materialize, AdamW's lazily created state is made first so a load can fill it in place."""
        out = {}
        for t, (unit, i) in zip(self.optimized, self._where):
            name = self.names[id(unit.params[i])] + (f".ep{self.comms.ep.rank}" if unit.expert else "")
            state = self.optimizer.state[t]
            if materialize and not state:
                _materialize_adam(state, t)
            for key, value in state.items():
                if torch.is_tensor(value):
                    out[f"{name}.{key}"] = value
        return out

    def model_state_bytes(self) -> dict[str, int]:
        """Per-rank bytes of parameters, gradients (the buckets) and optimizer states."""
        params = sum(p.numel() * p.element_size() for p in self.module.parameters())
        grads = sum(u.grad_full.numel() * u.grad_full.element_size() for u in self.units)
        masters = sum(m.numel() * m.element_size() for m in self.master_of.values())  # K counts them
        return {"params": params, "grads": grads, "optimizer": masters + optimizer_state_bytes(self.optimizer)}


def _materialize_adam(state: dict, t: torch.Tensor) -> None:
    state["step"] = torch.zeros((), dtype=torch.float32)
    state["exp_avg"] = torch.zeros_like(t)
    state["exp_avg_sq"] = torch.zeros_like(t)


@torch.no_grad()
def broadcast_module_state(module: nn.Module, comms: Comms) -> None:
    """Makes every rank's parameters and buffers equal to its group's first rank's, one message
    per dtype: over `comms.dp`, except expert slices (with expert parallelism), which go over
    `comms.expert_dp`, the ranks that hold the same experts."""
    experts = find_expert_parameters(module) if comms.experts_apart else []
    ids = {id(p) for p in experts}
    _broadcast([t for t in list(module.parameters()) + list(module.buffers()) if id(t) not in ids], comms.dp)
    if experts:
        _broadcast(experts, comms.expert_dp)


def _broadcast(tensors: list[torch.Tensor], comm: Communicator, src: int = 0) -> None:
    if comm.world_size == 1:
        return
    by_kind: dict[tuple, list[torch.Tensor]] = {}
    for t in tensors:
        by_kind.setdefault((t.dtype, t.device), []).append(t)
    for group in by_kind.values():
        flat = torch.cat([t.detach().reshape(-1) for t in group])
        comm.broadcast(flat, src)
        off = 0
        for t in group:
            t.copy_(flat[off: off + t.numel()].view_as(t))
            off += t.numel()


def apply_ddp(model: nn.Module, comms: Comms, *, param_groups: list[dict] | None = None, bucket_mb: float = 25.0,
              first_bucket_mb: float = 1.0, find_unused_parameters: bool = False,
              param_dtype: torch.dtype | None = None, reduce_dtype: torch.dtype | None = None) -> DataParallel:
    """Replicates `model` over `comms.dp`: rank 0's weights are broadcast, then gradients are
    averaged in overlapped buckets. `param_dtype` half: parameters cast to it, float32 masters
    kept; `reduce_dtype`: the buckets'. With `comms.expert_dp` (after apply_expert_parallel) the
    model's expert slices are replicated and reduced over it only."""
    broadcast_module_state(model, comms)
    return DataParallel(model, comms, param_groups=param_groups, bucket_mb=bucket_mb,
                        first_bucket_mb=first_bucket_mb, find_unused_parameters=find_unused_parameters,
                        param_dtype=param_dtype, reduce_dtype=reduce_dtype)
