"""ZeRO stages 1-3 over ringtrain's collectives (`apply_zero`).

Parameters are packed into flat units, each padded to a multiple of the world size
p and cut into p equal shards; rank r owns shard r of every unit and runs the
optimizer on its shards only (the optimizer is built over the shards, see
`ZeroModel.build_optimizer`). What each stage keeps per rank:

- stage 1: full parameters and full gradients (`.grad` views into flat buffers,
  all-reduced bucket by bucket during backward, as DDP); optimizer states for the
  shard only. After the step, every unit is all-gathered from the updated shards.
- stage 2: full parameters; gradients only as shards. Each unit's gradients are
  copied into one of two reusable staging buffers as backward produces them and
  reduce-scattered (averaged) while backward goes on; the parameters' own `.grad`
  are dropped. Gradients are reduced on every micro-step (as DeepSpeed's stage 2):
  only the shard is kept, so there is nothing local to accumulate into.
- stage 3: parameters sharded too. A unit is one transformer block (plus one root
  unit for embeddings, head and final norm). Its full parameters are all-gathered
  just before its forward, freed right after, gathered again before its backward
  and freed as soon as its last gradient is copied into staging (the reduce-scatter
  reads the staging buffer, not the parameters, so nothing waits for it); the next
  block's gather is started while the current block computes, so at most two blocks
  (plus the root unit) hold full parameters at any moment. The root unit stays
  gathered from the first forward to the end of backward, since the tied embedding
  is used at both ends.

Units never mix optimizer groups (weight decay / none), dtypes or devices. Stage 1
and 2 units are buckets in reverse registration order (about `bucket_mb` each).
Global-norm clipping sums squares over every rank's shards.

Mixed precision (`param_dtype` half, see parallel/precision.py): `full` (the
parameters in compute) is half; each rank's float32 master shard is a separate
tensor, the only place the optimizer writes. After a step the master shard is cast
into this rank's part of `full` (stage 3: into a persistent half shard, the gather
source) and all-gathered. Gradients travel in `reduce_dtype` (float32 by default):
staging buffers and gradient shards have that dtype and the hooks cast into them.

Expert parallelism (MoE): after `apply_expert_parallel` each rank holds one slice of
the experts, replicated only over `expert_comm` (Topology.expert_dp). Expert
parameters get units of their own, sharded over `expert_comm` instead of all ranks;
their gradients are scaled by 1 / world and summed over the replicas (an expert's
local gradient already sums its ep group's tokens; see parallel/data_parallel.py).
The clipping norm needs nothing special: summing every rank's shard squares over the
world counts each dense element and each expert element exactly once.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .collectives import Communicator
from .data_parallel import _plan_buckets, broadcast_module_state, optimizer_state_bytes


@dataclass
class Unit:
    """One flat, padded, sharded run of parameters."""

    index: int
    group: int                       # optimizer group index
    params: list[nn.Parameter]
    offsets: list[int]
    numel: int                       # real elements
    padded: int                      # multiple of world size
    full: torch.Tensor               # (padded,) full parameters (stage 3: storage freed when not in use)
    shard: nn.Parameter              # (padded / p,) this rank's master shard, what the optimizer updates
    half_shard: torch.Tensor | None  # mixed precision, stage 3: this rank's shard in param dtype (gather source)
    grad_dtype: torch.dtype          # dtype gradients are reduced in
    grad_full: torch.Tensor | None = None   # stage 1: (padded,) gradients, params' .grad are views
    grad_shard: torch.Tensor | None = None  # stage 2/3: (padded / p,) averaged gradient shard
    ready: set[int] = field(default_factory=set)
    handle: object = None
    staging: torch.Tensor | None = None
    incoming: torch.Tensor | None = None
    gathered: bool = True
    gather_handle: object = None
    handle_order: int = 0
    block: int = -1                  # stage 3: index of the block it belongs to; -1 = the root unit
    gather_target: torch.Tensor | None = None  # stage 3: `full`'s storage, its own version counter
    comm: Communicator | None = None # the ranks it is sharded over (all, or an expert slice's replicas)
    expert: bool = False

    @property
    def p(self) -> int:
        return self.comm.world_size

    @property
    def S(self) -> int:
        """Shard length."""
        return self.padded // self.comm.world_size

    @property
    def mine(self) -> slice:
        """This rank's shard within the padded unit."""
        return slice(self.comm.rank * self.S, (self.comm.rank + 1) * self.S)


class ZeroModel(nn.Module):
    """Wraps `module` for ZeRO `stage`; build with `apply_zero`."""

    STAGING = 3
    """Stage 2/3 staging buffers per dtype (each the size of the largest unit)."""

    def __init__(self, module: nn.Module, comm: Communicator, *, stage: int, param_groups: list[dict],
                 bucket_mb: float = 25.0, blocks: list[nn.Module] | None = None,
                 param_dtype: torch.dtype | None = None, reduce_dtype: torch.dtype | None = None,
                 expert_params: list[nn.Parameter] = (), expert_comm: Communicator | None = None,
                 ep_comm: Communicator | None = None):
        super().__init__()
        if stage not in (1, 2, 3):
            raise ValueError(f"parallel.name=zero{stage}: ZeRO stages are 1, 2 and 3")
        if bucket_mb <= 0:
            raise ValueError(f"parallel.bucket_mb must be > 0, got {bucket_mb}")
        self.module, self.comm, self.stage = module, comm, stage
        self.p, self.rank = comm.world_size, comm.rank
        self.expert_comm, self.ep_comm = expert_comm, ep_comm
        self._expert_ids = {id(q) for q in expert_params}
        if self._expert_ids and (expert_comm is None or ep_comm is None):
            raise ValueError("expert_params need expert_comm (ranks holding the same experts) and ep_comm")
        self.param_dtype, self.reduce_dtype = param_dtype, reduce_dtype
        self._names = {id(p): n for n, p in module.named_parameters()}
        self.group_options = [{k: v for k, v in g.items() if k != "params"} for g in param_groups]
        group_of = {id(p): gi for gi, g in enumerate(param_groups) for p in g["params"]}
        trainable = [p for p in module.parameters() if p.requires_grad]
        missing = [self._names[id(p)] for p in trainable if id(p) not in group_of]
        if missing:
            raise ValueError(f"param_groups leave out trainable parameters: {missing[:5]}")
        self.units: list[Unit] = []
        self._unit_of: dict[int, tuple[int, int]] = {}
        plan: list[tuple[list[nn.Parameter], int]] = []  # (parameters, owning block or -1)
        if stage == 3:
            blocks = list(blocks or [])
            in_block = {id(p) for b in blocks for p in b.parameters()}
            owned = [([p for p in trainable if id(p) not in in_block], -1)] + [
                ([p for p in b.parameters() if p.requires_grad], bi) for bi, b in enumerate(blocks)]
            plan = [([q for q in ps if group_of[id(q)] == gi and (id(q) in self._expert_ids) == ex], bi)
                    for ps, bi in owned for gi in range(len(param_groups)) for ex in (False, True)]
        else:
            for gi in range(len(param_groups)):
                mine = [q for q in reversed(trainable) if group_of[id(q)] == gi]
                cap = int(bucket_mb * 2**20)
                plan += [(ps, -1) for ps in _plan_buckets(mine, cap, cap, apart=self._expert_ids)]
        for ps, bi in plan:
            if ps:
                self._add_unit(ps, group_of[id(ps[0])], bi)
        self._sync = True
        self._next_launch = 0
        self._staging_pool: list[torch.Tensor] = []
        if stage == 3:
            self._setup_stage3(blocks)

    # -- building ------------------------------------------------------------
    @torch.no_grad()
    def _add_unit(self, params: list[nn.Parameter], group: int, block: int) -> None:
        dtypes = {(q.dtype, q.device) for q in params}
        if len(dtypes) > 1:  # stage 3 block with mixed dtypes: split it further
            for kind in dtypes:
                self._add_unit([q for q in params if (q.dtype, q.device) == kind], group, block)
            return
        expert = id(params[0]) in self._expert_ids
        comm = self.expert_comm if expert else self.comm
        numel = sum(q.numel() for q in params)
        padded = -(-numel // comm.world_size) * comm.world_size
        exact = params[0].new_zeros(padded)              # the parameters in their own (float32) dtype
        offsets, off = [], 0
        for q in params:
            offsets.append(off)
            exact[off: off + q.numel()].copy_(q.reshape(-1))
            off += q.numel()
        S = padded // comm.world_size
        ui = len(self.units)
        mine = slice(comm.rank * S, (comm.rank + 1) * S)
        mixed = self.param_dtype is not None and self.param_dtype != exact.dtype
        full = exact.to(self.param_dtype) if mixed else exact
        half_shard = None
        if mixed:
            shard = nn.Parameter(exact[mine].clone())    # float32 master, apart from the half `full`
            half_shard = full[mine].clone() if self.stage == 3 else None
        elif self.stage == 3:
            shard = nn.Parameter(exact[mine].clone())    # the only persistent copy
        else:
            shard = nn.Parameter(exact[mine])            # updating it updates my part of `full`
        grad_dtype = self.reduce_dtype or full.dtype
        unit = Unit(ui, group, list(params), offsets, numel, padded, full, shard, half_shard, grad_dtype,
                    block=block, comm=comm, expert=expert)
        for pi, q in enumerate(params):
            q.data = full[offsets[pi]: offsets[pi] + q.numel()].view_as(q)
            self._unit_of[id(q)] = (ui, pi)
            q.register_post_accumulate_grad_hook(self._on_grad_ready)
        if self.stage == 1:
            unit.grad_full = full.new_zeros(padded, dtype=grad_dtype)
            if grad_dtype == full.dtype:  # otherwise the hook adds half grads into it
                for pi, q in enumerate(params):
                    q.grad = unit.grad_full[offsets[pi]: offsets[pi] + q.numel()].view_as(q)
        else:
            unit.grad_shard = full.new_zeros(S, dtype=grad_dtype)
        self.units.append(unit)
        self._attach_shard_grad(unit)

    def build_optimizer(self, make, param_groups: list[dict] | None = None):
        """make(param_groups) -> optimizer over this rank's shards, in the groups given at
        construction (`param_groups` is accepted for symmetry with DataParallel and ignored)."""
        groups = [dict(self.group_options[gi], params=[u.shard for u in self.units if u.group == gi])
                  for gi in range(len(self.group_options))]
        self.optimizer = make([g for g in groups if g["params"]])
        return self.optimizer

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    # -- gradients -------------------------------------------------------------
    @contextlib.contextmanager
    def no_sync(self):
        """Stage 1: micro-steps accumulate locally and send nothing. Stages 2 and 3 keep
        only gradient shards, so they reduce on every micro-step anyway."""
        if self.stage != 1:
            yield
            return
        previous, self._sync = self._sync, False
        try:
            yield
        finally:
            self._sync = previous

    def _on_grad_ready(self, q: nn.Parameter) -> None:
        ui, pi = self._unit_of[id(q)]
        unit = self.units[ui]
        if self.stage == 1:
            view = unit.grad_full[unit.offsets[pi]: unit.offsets[pi] + q.numel()].view_as(q)
            if view.dtype != q.dtype:  # half gradients into a float32 buffer: add, drop
                view.add_(q.grad)
                q.grad = None
            elif q.grad.data_ptr() != view.data_ptr():
                view.copy_(q.grad)
                q.grad = view
            if not self._sync:
                return
        else:
            if unit.handle is not None:  # the previous micro-step's reduction of this unit
                self._complete(unit)
            if unit.staging is None:
                unit.staging = self._take_staging(unit)
            unit.staging[unit.offsets[pi]: unit.offsets[pi] + q.numel()].copy_(q.grad.reshape(-1))
            if len(unit.ready) == 0:
                unit.staging[unit.numel:unit.padded].zero_()
            q.grad = None  # only the shard is kept
        if pi in unit.ready:
            raise RuntimeError(f"parameter {self._names.get(id(q), '?')} got a gradient twice in one backward")
        unit.ready.add(pi)
        if len(unit.ready) == len(unit.params):
            self._launch(unit)

    def _take_staging(self, unit: Unit) -> torch.Tensor:
        """A staging buffer of the unit's size. At most STAGING buffers exist per dtype (the
        transient cost of stage 2/3 beyond the shards); when all are in use, wait for the
        oldest reduce-scatter. Only if every one is held by a unit still filling (its
        gradients interleave with others') is one more made, so backward never deadlocks."""
        self._reap()
        while True:
            dtype = unit.grad_dtype
            for i, buf in enumerate(self._staging_pool):
                if buf.dtype == dtype and buf.device == unit.full.device and buf.numel() >= unit.padded:
                    self._staging_pool.pop(i)
                    return buf
            held = [u for u in self.units if u.staging is not None and u.grad_dtype == dtype]
            if len(held) < self.STAGING:
                size = max(u.padded for u in self.units if u.grad_dtype == dtype)
                return unit.full.new_zeros(size, dtype=dtype)
            inflight = [u for u in held if u.handle is not None]
            if not inflight:
                return unit.full.new_zeros(unit.padded, dtype=dtype)
            self._complete(min(inflight, key=lambda u: u.handle_order))

    def _reap(self) -> None:
        """Completes reductions that already finished (frees staging, stage 3 frees params)."""
        for u in self.units:
            if u.handle is not None and u.handle.is_completed():
                self._complete(u)

    def _launch(self, unit: Unit) -> None:
        grads = unit.grad_full if self.stage == 1 else unit.staging[: unit.padded]
        op = "avg"
        if unit.expert:  # see the module docstring
            grads.mul_(1.0 / self.p)
            op = "sum"
        if self.stage == 1:
            unit.handle = unit.comm.all_reduce(grads, op=op, async_op=True)
        else:
            unit.incoming = unit.grad_shard.new_empty(unit.S)
            unit.handle = unit.comm.reduce_scatter(unit.incoming, grads, op=op, async_op=True)
            unit.ready.clear()  # the next micro-step's gradients start a new round
            if self.stage == 3 and unit.block >= 0:
                # every gradient of the unit is in staging: backward needs its parameters no more
                self._free(unit)
        self._next_launch += 1
        unit.handle_order = self._next_launch

    def _complete(self, unit: Unit) -> None:
        unit.handle.wait()
        unit.handle = None
        if self.stage != 1:
            unit.grad_shard.add_(unit.incoming)
            unit.incoming = None
            self._staging_pool.append(unit.staging)
            unit.staging = None
            if self.stage == 3 and unit.block >= 0:
                self._free(unit)

    def finish_gradient_sync(self) -> None:
        """Waits for every unit's reduction (call after each synchronised backward)."""
        if not self._sync:
            return
        # stage 1: every parameter must be ready; stages 2/3 clear a unit at launch, so a
        # unit still partly filled is one whose other parameters got no gradient
        missing = [self._names.get(id(q), "?") for u in self.units for i, q in enumerate(u.params)
                   if i not in u.ready and (self.stage == 1 or u.ready)]
        if missing:
            raise RuntimeError(f"{len(missing)} parameter(s) received no gradient: {', '.join(missing[:8])}")
        for u in self.units:
            if u.handle is not None:
                self._complete(u)
            u.ready.clear()
        self._next_launch = 0
        if self.stage == 3:
            for u in self.units:
                self._free(u)

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-step's (already 1/grad_accum-scaled) loss; the hooks do the rest."""
        loss.backward()

    def optimizer_step(self) -> None:
        """The optimizer step on this rank's shards, then the all-gather of the updated ones."""
        self.optimizer.step()
        self.after_step()

    def _attach_shard_grad(self, unit: Unit) -> None:
        """The master shard's .grad: a view of this rank's part of the reduced gradients
        when their dtype is the master's; otherwise None until master_grads()."""
        if unit.grad_dtype != unit.shard.dtype:
            unit.shard.grad = None
        elif self.stage == 1:
            unit.shard.grad = unit.grad_full[unit.mine]
        else:
            unit.shard.grad = unit.grad_shard

    def master_grads(self) -> list[torch.Tensor]:
        """The float32 gradient shards the optimizer reads (after finish_gradient_sync);
        made here as copies when gradients were reduced in half precision."""
        for u in self.units:
            if u.shard.grad is None:
                g = u.grad_full[u.mine] if self.stage == 1 else u.grad_shard
                u.shard.grad = g.to(u.shard.dtype)
        return [u.shard.grad for u in self.units]

    def nonfinite_grad_names(self, limit: int = 8) -> list[str]:
        """Names of the first parameters with a non-finite element in this rank's gradient shards."""
        out: list[str] = []
        for u, g in zip(self.units, self.master_grads()):
            bad = (~torch.isfinite(g)).nonzero().flatten()
            for i in bad.tolist():
                pos = u.mine.start + i
                if pos >= u.numel:
                    continue
                pi = max(j for j, off in enumerate(u.offsets) if off <= pos)
                name = self._names.get(id(u.params[pi]), "?")
                if name not in out:
                    out.append(name)
                    if len(out) >= limit:
                        return out
        return out

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Global L2 norm over every rank's gradient shards; scales them when above max_norm."""
        grads = self.master_grads()
        sq = torch.zeros(1, dtype=torch.float64, device=grads[0].device if grads else "cpu")
        for g in grads:
            sq += g.double().pow(2).sum()
        self.comm.all_reduce(sq, op="sum")
        norm = sq.sqrt().float()[0]
        if math.isfinite(max_norm):
            coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
            for g in grads:
                g.mul_(coef.to(g.dtype))
        return norm

    @torch.no_grad()
    def after_step(self) -> None:
        """Brings the updated shards back into full parameters (stages 1 and 2); stage 3
        only refreshes its half gather source from the masters."""
        for u in self.units:
            if self.stage == 3:
                if u.half_shard is not None:
                    u.half_shard.copy_(u.shard)
                continue
            mine = u.full[u.mine]
            if mine.data_ptr() != u.shard.data_ptr():
                mine.copy_(u.shard)  # float32 master -> half parameters
            u.comm.all_gather(u.full, mine.clone())

    def zero_grad(self) -> None:
        for u in self.units:
            if self.stage == 1:
                u.grad_full.zero_()
                for pi, q in enumerate(u.params):
                    view = u.grad_full[u.offsets[pi]: u.offsets[pi] + q.numel()].view_as(q)
                    if view.dtype != q.dtype:
                        q.grad = None
                    elif q.grad is None or q.grad.data_ptr() != view.data_ptr():
                        q.grad = view
            else:
                u.grad_shard.zero_()
            self._attach_shard_grad(u)

    # -- stage 3: gather and free ----------------------------------------------
    def _setup_stage3(self, blocks: list[nn.Module]) -> None:
        self._units_of_block: dict[int, list[Unit]] = {}
        for u in self.units:
            self._units_of_block.setdefault(u.block, []).append(u)
            u.gather_target = torch.empty(0, dtype=u.full.dtype, device=u.full.device).set_(
                u.full.untyped_storage(), 0, (u.padded,))
        for u in self.units:
            self._free(u)
        self.module.register_forward_pre_hook(lambda m, a: self._gather_root())
        for bi, block in enumerate(blocks):
            block.register_forward_pre_hook(lambda m, a, bi=bi: self._pre_forward(bi))
            block.register_forward_hook(lambda m, a, o, bi=bi: self._post_forward(bi))
            block.register_full_backward_pre_hook(lambda m, g, bi=bi: self._pre_backward(bi))

    def _block_units(self, bi: int) -> list[Unit]:
        """Units of block bi (none past either end, so prefetching the neighbour is safe)."""
        return self._units_of_block.get(bi, []) if bi >= 0 else []

    def _free(self, unit: Unit) -> None:
        if unit.gathered:
            unit.full.untyped_storage().resize_(0)
            unit.gathered = False

    def _start_gather(self, unit: Unit) -> None:
        if unit.gathered or unit.gather_handle is not None:
            return
        unit.full.untyped_storage().resize_(unit.padded * unit.full.element_size())
        # into gather_target: the parameters' views (saved by autograd for backward) must not
        # see a version bump when their storage is refilled with the same values
        source = unit.half_shard if unit.half_shard is not None else unit.shard.detach()
        unit.gather_handle = unit.comm.all_gather(unit.gather_target, source, async_op=True)

    def _wait_gather(self, unit: Unit) -> None:
        self._start_gather(unit)
        if unit.gather_handle is not None:
            unit.gather_handle.wait()
            unit.gather_handle = None
        unit.gathered = True

    def _gather_root(self) -> None:
        for u in self._units_of_block.get(-1, []):
            self._wait_gather(u)

    def _pre_forward(self, bi: int) -> None:
        for u in self._block_units(bi):
            self._wait_gather(u)
        for u in self._block_units(bi + 1):  # prefetch the next block while this one computes
            self._start_gather(u)

    def _post_forward(self, bi: int) -> None:
        for u in self._block_units(bi):
            self._free(u)

    def _pre_backward(self, bi: int) -> None:
        self._reap()
        for u in self._block_units(bi):
            self._wait_gather(u)
        for u in self._block_units(bi - 1):  # backward runs the blocks in reverse
            self._start_gather(u)

    @contextlib.contextmanager
    def gathered(self):
        """Full parameters everywhere inside (stage 3), e.g. to save a consolidated state_dict."""
        if self.stage != 3:
            yield
            return
        for u in self.units:
            self._wait_gather(u)
        try:
            yield
        finally:
            for u in self.units:
                self._free(u)

    @torch.no_grad()
    def consolidated_state_dict(self) -> dict | None:
        """Collective: the model's full state_dict on rank 0 (None elsewhere), parameters
        taken from the float32 master shards (all-gathered unit by unit), so a resumed
        mixed-precision run starts from exactly the masters it saved."""
        values: dict[int, torch.Tensor] = {}
        for u in self.units:
            flat = u.shard.new_empty(u.padded)
            u.comm.all_gather(flat, u.shard.detach())
            for q, off in zip(u.params, u.offsets):
                local = flat[off: off + q.numel()].view(q.shape)
                if u.expert:  # this rank's slice of the experts: the ep group holds the rest, in order
                    full = local.new_empty((local.shape[0] * self.ep_comm.world_size, *local.shape[1:]))
                    self.ep_comm.all_gather(full.view(-1), local.contiguous().view(-1))
                    local = full
                if self.rank == 0:
                    values[id(q)] = local.clone()
        if self.rank != 0:
            return None
        return {k: values[id(v)] if id(v) in values else v.detach().clone()
                for k, v in self.module.state_dict(keep_vars=True).items()}

    # -- resharding checkpoints (torch.distributed.checkpoint) ------------------------
    def _dtensor_state(self) -> dict:
        """This rank's optimizer state as DTensors over the unpadded global unit vectors.

        Shard r of a unit covers [r S, (r + 1) S) of its real elements, which is the layout
        torch.chunk gives (DTensor's Shard(0)), so a checkpoint written by N ranks can be
        read by M ranks: DCP moves the overlapping pieces. Keys name units, whose
        composition does not depend on the world size."""
        from torch.distributed.device_mesh import DeviceMesh
        from torch.distributed.tensor import DTensor, Shard

        device_type = self.units[0].full.device.type if self.units else "cpu"
        meshes = {id(self.comm): DeviceMesh.from_group(self.comm.group, device_type)}
        if self._expert_ids:
            meshes[id(self.expert_comm)] = DeviceMesh.from_group(self.expert_comm.group, device_type)
        out = {}
        for u in self.units:
            real = max(0, min(u.S, u.numel - u.mine.start))
            # an expert unit's state differs per expert slice: its keys name the ep rank
            name = f"unit{u.index}" + (f".ep{self.ep_comm.rank}" if u.expert else "")
            for key, t in self.optimizer.state[u.shard].items():
                if torch.is_tensor(t) and t.dim() == 1 and t.numel() == u.S:
                    out[f"{name}.{key}"] = DTensor.from_local(t[:real], meshes[id(u.comm)], [Shard(0)],
                                                              run_check=False, shape=(u.numel,), stride=(1,))
                elif torch.is_tensor(t):
                    out[f"{name}.{key}"] = t  # scalars (Adam's step): the same on every rank
        return out

    def save_optimizer(self, ckpt_dir) -> None:
        """Collective: writes the sharded optimizer state to <ckpt_dir>/optimizer/ (DCP)."""
        import torch.distributed.checkpoint as dcp

        dcp.save(self._dtensor_state(), checkpoint_id=str(Path(ckpt_dir) / "optimizer"),
                 process_group=self.comm.group)

    @torch.no_grad()
    def load_optimizer(self, ckpt_dir) -> None:
        """Collective: reads a state written by save_optimizer, with any world size."""
        import torch.distributed.checkpoint as dcp

        path = Path(ckpt_dir) / "optimizer"
        for u in self.units:  # AdamW creates its state lazily; make it so DCP can fill it in place
            st = self.optimizer.state[u.shard]
            if not st:
                st["step"] = torch.zeros((), dtype=torch.float32)
                st["exp_avg"] = torch.zeros_like(u.shard)
                st["exp_avg_sq"] = torch.zeros_like(u.shard)
        from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

        if not (path / ".metadata").is_file():
            raise ValueError(f"trainer.resume: {path} holds no sharded optimizer state (.metadata missing)")
        state = self._dtensor_state()
        try:
            dcp.load(state, checkpoint_id=str(path), process_group=self.comm.group)
        except (Exception, CheckpointException) as e:  # another unit layout, or a missing shard file
            raise ValueError(f"trainer.resume: cannot read the sharded optimizer state in {path}: {e}") from None

    # -- accounting --------------------------------------------------------------
    def model_state_bytes(self) -> dict[str, int]:
        """Persistent per-rank bytes of parameters, gradients and optimizer states."""
        S = lambda u: u.S  # noqa: E731
        if self.stage == 3:
            params = sum(S(u) * u.full.element_size() for u in self.units)
        else:
            params = sum(u.padded * u.full.element_size() for u in self.units)
        if self.stage == 1:
            grads = sum(u.grad_full.numel() * u.grad_full.element_size() for u in self.units)
        else:
            grads = sum(u.grad_shard.numel() * u.grad_shard.element_size() for u in self.units)
        # float32 masters distinct from the parameters count with the optimizer states (K = 12)
        masters = sum(S(u) * u.shard.element_size() for u in self.units if u.shard.dtype != u.full.dtype)
        return {"params": params, "grads": grads,
                "optimizer": masters + optimizer_state_bytes(getattr(self, "optimizer", None))}


def apply_zero(model: nn.Module, group=None, *, stage: int, param_groups: list[dict], algorithm: str = "ring",
               bucket_mb: float = 25.0, blocks: list[nn.Module] | None = None,
               param_dtype: torch.dtype | None = None, reduce_dtype: torch.dtype | None = None,
               expert_params: list[nn.Parameter] = (), expert_comm: Communicator | None = None,
               ep_comm: Communicator | None = None, comm: Communicator | None = None) -> ZeroModel:
    """Shards `model`'s training state over `group` (ZeRO `stage`), after making every
    rank's weights rank 0's. `blocks`: the stage-3 gather units (e.g. the transformer blocks).
    `param_dtype` half: half parameters, float32 master shards; `reduce_dtype`: gradients'.
    `expert_params` (after apply_expert_parallel): sharded over `expert_comm` only; `ep_comm`
    gathers them for consolidated checkpoints."""
    comm = comm or Communicator(group, algorithm=algorithm)
    broadcast_module_state(model, comm, expert_params=expert_params, expert_comm=expert_comm)
    return ZeroModel(model, comm, stage=stage, param_groups=param_groups, bucket_mb=bucket_mb, blocks=blocks,
                     param_dtype=param_dtype, reduce_dtype=reduce_dtype, expert_params=expert_params,
                     expert_comm=expert_comm, ep_comm=ep_comm)
