"""`ZeroModel`: ZeRO stages 1-3, the optimizer states sharded over the data-parallel ranks.

Parameters are packed into flat units (parallel/flat_params.py), each padded to a
multiple of its group size p and cut into p equal shards; rank r owns shard r of every
unit and the optimizer runs on its shards only. What each stage keeps per rank
(`ZeroStage`):

- stage 1: full parameters and full gradients (a whole-gradient buffer per unit,
  all-reduced during backward as DDP's buckets); optimizer states for the shard only.
  After the step every unit is all-gathered from the updated shards.
- stage 2: full parameters, gradients only as shards: each unit's gradients are staged
  and reduce-scattered while backward goes on (parallel/grad_sync.py), on every
  micro-step, since only the shard is kept.
- stage 3: parameters sharded too, one unit per transformer block plus a root unit
  (embeddings, head, final norm), gathered for forward and backward and freed between
  (parallel/zero/stage3.py).

Units never mix optimizer groups, dtypes, devices or expert weights. Stage 1 and 2 units
are buckets in reverse registration order (about `bucket_mb` each).

Mixed precision (`param_dtype` half): `full` (the parameters in compute) is half; each
rank's float32 master shard is a separate tensor, the only place the optimizer writes.
After a step it is cast into this rank's part of `full` (stage 3: into a persistent half
shard, the gather source) and all-gathered. Gradients travel in `reduce_dtype`.

The clip needs nothing special: summing every rank's shard squares over the world counts
each dense element and each expert element exactly once. Resharding checkpoints:
parallel/zero/reshard.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..flat_model import FlatParamModel, optimizer_state_bytes
from ..flat_params import FlatUnit, plan_buckets
from ..grad_sync import GradSync
from ..mesh import Comms
from .reshard import dtensor_optimizer_state
from .stage3 import Stage3Gather


@dataclass(frozen=True)
class ZeroStage:
    """What one ZeRO stage shards, beyond the optimizer states every stage shards."""

    stage: int

    def __post_init__(self):
        if self.stage not in (1, 2, 3):
            raise ValueError(f"ZeRO stages are 1, 2 and 3, got {self.stage}")

    @property
    def grads(self) -> bool:
        return self.stage >= 2

    @property
    def params(self) -> bool:
        return self.stage == 3


class ZeroModel(FlatParamModel):
    """Wraps `module` for ZeRO `stage`; build with `apply_zero`."""

    def __init__(self, module: nn.Module, comms: Comms, *, stage: int, param_groups: list[dict],
                 bucket_mb: float = 25.0, blocks: list[nn.Module] | None = None,
                 param_dtype: torch.dtype | None = None, reduce_dtype: torch.dtype | None = None):
        super().__init__(module, comms, param_groups)
        if bucket_mb <= 0:
            raise ValueError(f"bucket_mb must be > 0, got {bucket_mb}")
        self.shards = ZeroStage(stage)
        self.param_dtype, self.reduce_dtype = param_dtype, reduce_dtype
        for params, block in self._plan(bucket_mb, list(blocks or [])):
            self._add_unit(params, self.group_of[id(params[0])], block)
        self.gather = Stage3Gather(module, self.units, list(blocks or [])) if self.shards.params else None
        self.grad_sync = GradSync(self.units, self.names, in_order=False,
                                  on_launched=self.gather.on_launched if self.gather else None)
        if self.gather is not None:
            self.gather.grad_sync = self.grad_sync

    @property
    def stage(self) -> int:
        return self.shards.stage

    def _plan(self, bucket_mb: float, blocks: list[nn.Module]) -> list[tuple[list[nn.Parameter], int]]:
        """(parameters, owning block or -1) per unit, before splitting by dtype."""
        trainable = [p for p in self.module.parameters() if p.requires_grad]
        n_groups = len(self.group_options)
        if self.shards.params:
            in_block = {id(p) for b in blocks for p in b.parameters()}
            owned = [([p for p in trainable if id(p) not in in_block], -1)] + [
                ([p for p in b.parameters() if p.requires_grad], bi) for bi, b in enumerate(blocks)]
            plan = [([q for q in ps if self.group_of[id(q)] == gi and (id(q) in self.expert_ids) == ex], bi)
                    for ps, bi in owned for gi in range(n_groups) for ex in (False, True)]
        else:
            plan, cap = [], int(bucket_mb * 2**20)
            for gi in range(n_groups):
                mine = [q for q in reversed(trainable) if self.group_of[id(q)] == gi]
                plan += [(ps, -1) for ps in plan_buckets(mine, cap, cap, apart=self.expert_ids)]
        return [(ps, bi) for ps, bi in plan if ps]

    @torch.no_grad()
    def _add_unit(self, params: list[nn.Parameter], group: int, block: int) -> None:
        kinds = sorted({(q.dtype, q.device) for q in params}, key=str)
        if len(kinds) > 1:  # stage 3 block with mixed dtypes: split it further
            for kind in kinds:
                self._add_unit([q for q in params if (q.dtype, q.device) == kind], group, block)
            return
        expert = id(params[0]) in self.expert_ids
        mixed = self.param_dtype is not None and self.param_dtype != params[0].dtype
        unit = FlatUnit(len(self.units), list(params), self.unit_comm(expert),
                        self.reduce_dtype or (self.param_dtype if mixed else params[0].dtype), sharded=True,
                        expert=expert, world_size=self.comm.world_size, group=group, block=block)
        exact = params[0].new_zeros(unit.padded)          # the parameters in their own (float32) dtype
        for i, q in enumerate(params):
            exact[unit.slot(i)].copy_(q.reshape(-1))
        unit.full = exact.to(self.param_dtype) if mixed else exact
        if mixed:
            unit.shard = nn.Parameter(exact[unit.mine].clone())     # float32 master, apart from the half `full`
            unit.half_shard = unit.full[unit.mine].clone() if self.shards.params else None
        elif self.shards.params:
            unit.shard = nn.Parameter(exact[unit.mine].clone())     # the only persistent copy
        else:
            unit.shard = nn.Parameter(exact[unit.mine])             # updating it updates my part of `full`
        for i, q in enumerate(params):
            q.data = unit.full[unit.slot(i)].view_as(q)
        unit.make_grad_buffer(whole=not self.shards.grads)
        self.units.append(unit)
        self._add_optimized(unit.shard, unit.reduced_grad, unit, None, self.comm)
        unit.shard.grad = unit.reduced_grad if unit.reduced_grad.dtype == unit.shard.dtype else None

    def finish_gradient_sync(self) -> None:
        super().finish_gradient_sync()
        if self.gather is not None:
            self.gather.free_all()

    @torch.no_grad()
    def after_step(self) -> None:
        """Brings the updated shards back into full parameters (stages 1 and 2); stage 3 only
        refreshes its half gather source from the masters."""
        for u in self.units:
            if self.shards.params:
                if u.half_shard is not None:
                    u.half_shard.copy_(u.shard)
                continue
            mine = u.full[u.mine]
            if mine.data_ptr() != u.shard.data_ptr():
                mine.copy_(u.shard)  # float32 master -> half parameters
            u.comm.all_gather(u.full, mine.clone())

    def gathered(self):
        """Full parameters everywhere inside (stage 3), e.g. to read a consolidated state_dict."""
        return self.gather.gathered() if self.gather is not None else super().gathered()

    @torch.no_grad()
    def master_values(self) -> dict[int, torch.Tensor]:
        """Each unit's float32 master shards all-gathered, unit by unit."""
        values = {}
        for u in self.units:
            flat = u.shard.new_empty(u.padded)
            u.comm.all_gather(flat, u.shard.detach())
            for i, q in enumerate(u.params):
                values[id(q)] = flat[u.slot(i)].view(q.shape)
        return values

    def optimizer_state(self, materialize: bool = False) -> dict:
        """This rank's optimizer state as DTensors over the unpadded unit vectors (any world size
        can read it back); with materialize, AdamW's lazy state is created first."""
        return dtensor_optimizer_state(self.units, self.optimizer, self.comms, materialize=materialize)

    def model_state_bytes(self) -> dict[str, int]:
        """Persistent per-rank bytes of parameters, gradients and optimizer states."""
        if self.shards.params:
            params = sum(u.S * u.full.element_size() for u in self.units)
        else:
            params = sum(u.padded * u.full.element_size() for u in self.units)
        grads = sum(u.nbytes(u.grad_full) + u.nbytes(u.grad_shard) for u in self.units)
        # float32 masters distinct from the parameters count with the optimizer states (K = 12)
        masters = sum(u.S * u.shard.element_size() for u in self.units if u.shard.dtype != u.full.dtype)
        return {"params": params, "grads": grads, "optimizer": masters + optimizer_state_bytes(self.optimizer)}
