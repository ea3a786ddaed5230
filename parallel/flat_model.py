"""`FlatParamModel`: what DDP and every ZeRO stage share on top of their flat units.

A subclass plans the units (`FlatUnit`), decides what the optimizer updates (the
"optimized" tensors, each paired with the reduced gradient it reads) and what happens
after a step; everything else is here, once:

- the gradient hooks and launches (`GradSync`), `no_sync`, `finish_gradient_sync`, `zero_grad`;
- float32 master gradients (`master_grads`): views of the reduced buffers when those are
  float32, float32 copies when gradients travelled in half precision;
- the global-norm clip (`clip_grad_norm_`): each optimized tensor's gradient is either
  replicated on every rank (counted locally) or one of disjoint pieces spread over a
  group (its squares summed over that group); a model whose gradients are all
  replicated is clipped by torch.nn.utils.clip_grad_norm_ itself, so plain DDP matches
  a single process exactly;
- naming the parameters whose reduced gradients are not finite;
- the optimizer over the optimized tensors, in the parameter groups given at wrap time;
- the consolidated state_dict (float32 masters, expert slices gathered over the ep group).

Expert parallelism: after `apply_expert_parallel` each rank holds a slice of the
experts, replicated only over `comms.expert_dp`; their units reduce (and shard) over
that group, pre-scaled by 1 / world (see FlatUnit.reduce), and the clip counts every
expert element once.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn

from .collectives import Communicator
from .flat_params import FlatUnit
from .grad_sync import GradSync
from .mesh import Comms


def find_expert_parameters(module: nn.Module) -> list[nn.Parameter]:
    """Expert weights of every MoE layer (duck-typed: a layer with `shard_experts` and
    `expert_parameters`, so parallel/ never imports models/), in module order."""
    return [p for m in module.modules() if callable(getattr(m, "shard_experts", None))
            for p in m.expert_parameters()]


def optimizer_state_bytes(optimizer) -> int:
    """Bytes of an optimizer's per-parameter state tensors (Adam's moments); scalars such as
    the step count are not counted. 0 before the optimizer exists."""
    if optimizer is None:
        return 0
    return sum(t.numel() * t.element_size() for state in optimizer.state.values() for t in state.values()
               if torch.is_tensor(t) and t.dim() > 0)


class FlatParamModel(nn.Module):
    """Base of DataParallel and ZeroModel; see the module docstring."""

    def __init__(self, module: nn.Module, comms: Comms, param_groups: list[dict] | None):
        super().__init__()
        self.module, self.comms, self.comm = module, comms, comms.dp
        self.names = {id(p): n for n, p in module.named_parameters()}
        trainable = [p for p in module.parameters() if p.requires_grad]
        groups = param_groups if param_groups is not None else [{"params": trainable}]
        self.group_options = [{k: v for k, v in g.items() if k != "params"} for g in groups]
        self.group_of = {id(p): gi for gi, g in enumerate(groups) for p in g["params"]}
        left_out = [self.names[id(p)] for p in trainable if id(p) not in self.group_of]
        if left_out:
            raise ValueError(f"param_groups leave out trainable parameters: {left_out[:5]}")
        self.expert_ids = {id(p) for p in find_expert_parameters(module)} if comms.experts_apart else set()
        self.units: list[FlatUnit] = []
        self.optimizer = None
        # filled by the subclass: what the optimizer updates, in order, and per tensor the
        # reduced gradient it reads, where its parameter(s) live and which group sums its squares
        self.optimized: list[nn.Parameter] = []
        self._reduced: list[torch.Tensor] = []
        self._where: list[tuple[FlatUnit, int | None]] = []
        self._norm_group: list[Communicator | None] = []
        self.grad_sync: GradSync | None = None

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def unit_comm(self, expert: bool) -> Communicator:
        return self.comms.expert_dp if expert else self.comms.dp

    def _add_optimized(self, tensor: nn.Parameter, reduced: torch.Tensor, unit: FlatUnit, param_index: int | None,
                       norm_group: Communicator | None) -> None:
        self.optimized.append(tensor)
        self._reduced.append(reduced)
        self._where.append((unit, param_index))
        self._norm_group.append(norm_group)

    # -- gradients -------------------------------------------------------------
    def no_sync(self):
        """Micro-steps inside accumulate locally and send nothing (ZeRO-2/3 reduce anyway)."""
        return self.grad_sync.no_sync()

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-step's (already 1/grad_accum-scaled) loss; the hooks do the rest."""
        loss.backward()

    def finish_gradient_sync(self) -> None:
        """Waits until every unit's gradients are reduced; call after the last micro-step's backward."""
        self.grad_sync.finish()

    def zero_grad(self) -> None:
        """Zeroes every gradient buffer and re-attaches the `.grad` views an optimizer may have dropped."""
        for u in self.units:
            u.zero_grad()
        self._attach_optimized_grads()

    def _attach_optimized_grads(self) -> None:
        """An optimized tensor's .grad is its reduced gradient when the dtypes agree; otherwise
        None until master_grads() makes a float32 copy."""
        for t, reduced in zip(self.optimized, self._reduced):
            t.grad = reduced if reduced.dtype == t.dtype else None

    def master_grads(self) -> list[torch.Tensor]:
        """The float32 gradients the optimizer will read (after finish_gradient_sync)."""
        for t, reduced in zip(self.optimized, self._reduced):
            if t.grad is None:
                t.grad = reduced.to(t.dtype)
        return [t.grad for t in self.optimized]

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Global L2 norm of the (reduced) gradients over every rank; clipped in place to max_norm."""
        grads = self.master_grads()
        if all(g is None for g in self._norm_group):  # replicated everywhere: torch's own arithmetic
            return torch.nn.utils.clip_grad_norm_(self.optimized, max_norm)
        device = grads[0].device if grads else torch.device("cpu")
        local = torch.zeros((), dtype=torch.float64)
        sums: dict[int, tuple[Communicator, torch.Tensor]] = {}
        for g, group in zip(grads, self._norm_group):
            if group is None:
                local = local + g.double().pow(2).sum()
            else:
                _, sq = sums.setdefault(id(group), (group, torch.zeros(1, dtype=torch.float64, device=device)))
                sq += g.double().pow(2).sum()
        total = local.to(device)
        for group, sq in sums.values():
            group.all_reduce(sq, op="sum")
            total = total + sq[0]
        norm = total.sqrt().float()
        if math.isfinite(max_norm):
            coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
            torch._foreach_mul_(grads, coef)
        return norm

    def nonfinite_grad_names(self, limit: int = 8) -> list[str]:
        """Names of the first parameters with a non-finite element in this rank's reduced gradients."""
        out: list[str] = []
        for g, (unit, pi) in zip(self.master_grads(), self._where):
            if pi is not None:
                candidates = [pi] if not torch.isfinite(g).all() else []
            else:
                bad = (~torch.isfinite(g)).nonzero().flatten().tolist()
                candidates = [unit.owner_of(unit.mine.start + i) for i in bad]
            for i in candidates:
                name = self.names.get(id(unit.params[i]), "?") if i is not None else None
                if name is not None and name not in out:
                    out.append(name)
                    if len(out) >= limit:
                        return out
        return out

    # -- the optimizer ---------------------------------------------------------
    def build_optimizer(self, make):
        """make(param_groups) -> optimizer over the optimized tensors, in the groups given at wrap time."""
        groups = [dict(opts, params=[]) for opts in self.group_options]
        for t, (unit, pi) in zip(self.optimized, self._where):
            gi = unit.group if pi is None else self.group_of[id(unit.params[pi])]
            groups[gi]["params"].append(t)
        self.optimizer = make([g for g in groups if g["params"]])
        return self.optimizer

    def optimizer_step(self) -> None:
        """The optimizer step, then whatever brings the parameters in compute up to date."""
        self.optimizer.step()
        self.after_step()

    def after_step(self) -> None:
        raise NotImplementedError

    def gathered(self):
        """Full parameters are present inside (ZeRO-3 gathers them)."""
        return contextlib.nullcontext()

    # -- state -----------------------------------------------------------------
    def master_values(self) -> dict[int, torch.Tensor]:
        """Collective: id(parameter) -> this rank's float32 (master) value of it, whole."""
        raise NotImplementedError

    @torch.no_grad()
    def consolidated_state_dict(self) -> dict | None:
        """Collective: the model's state_dict on rank 0 (None elsewhere), parameters taken from the
        float32 masters and expert slices gathered from the ep group (experts in order), so a
        resumed mixed-precision run starts from exactly what was saved."""
        values = self.master_values()
        ep = self.comms.ep
        for p in self.module.parameters():  # the same order on every rank
            if id(p) in self.expert_ids:
                local = values[id(p)].contiguous()
                whole = local.new_empty((local.shape[0] * ep.world_size, *local.shape[1:]))
                ep.all_gather(whole.view(-1), local.view(-1))
                values[id(p)] = whole
        if self.comm.rank != 0:
            return None
        return {k: values[id(v)].clone() if id(v) in values else v.detach().clone()
                for k, v in self.module.state_dict(keep_vars=True).items()}
