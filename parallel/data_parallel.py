"""Data parallelism: every rank holds the whole model, gradients are averaged in buckets.

How a step's gradients travel:
- At wrap time the parameters are packed, in reverse registration order (roughly the
  order backward produces their gradients), into flat buckets of `bucket_mb`
  (the first one capped at `first_bucket_mb`, so communication starts early), one
  bucket per (dtype, device). Each parameter's `.grad` is a view into its bucket,
  so autograd accumulates straight into the buffer that is sent: no copies.
- A post-accumulate-grad hook counts the parameters of a bucket as backward finishes
  them; when the last one is in, the bucket's all-reduce (average, with the chosen
  collective algorithm) is queued on the Communicator's background thread and the
  rest of backward keeps computing. Buckets are launched in index order, so every
  rank issues the same collectives in the same order.
- `no_sync()` (gradient-accumulation micro-steps) turns the hooks off: gradients just
  accumulate in the buckets and nothing is sent.
- `finish_gradient_sync()` (before clipping and the optimizer step) waits for every
  bucket. A parameter that got no gradient is an error naming it, unless
  `find_unused_parameters=True`, in which case its (zero or micro-step-accumulated)
  slot is averaged like any other.

Mixed precision (`param_dtype` half, see parallel/precision.py): the parameters are
cast to half and a float32 master copy of each is what the optimizer updates. Buckets
hold the communication dtype (`reduce_dtype`, float32 by default): when it differs
from the parameters', `.grad` cannot be a view, so the hook adds each half gradient
into its bucket slot and drops it. With float32 buckets the masters' `.grad` are
bucket views; with half buckets they are float32 copies made after the reduction.

Expert parallelism (MoE, parallel/expert_parallel.py): expert weights differ between
ranks of an ep group, so they live in buckets of their own, reduced over `expert_comm`
(the ranks holding the same experts, Topology.expert_dp) instead of all ranks. An
expert's local gradient already sums the contributions of every rank of its ep group
(the all-to-all's backward brings them), so its bucket is scaled by 1 / world size
and summed over the replicas: the same average over all ranks' tokens that dense
parameters get.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from .atomic import atomic_write
from .collectives import Communicator


@dataclass
class GradBucket:
    """A flat gradient buffer shared by a run of parameters of one dtype and device."""

    index: int
    buffer: torch.Tensor
    comm: Communicator
    prescale: float = 1.0            # expert buckets: 1 / world, then a sum over the replicas
    params: list[nn.Parameter] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    ready: set[int] = field(default_factory=set)
    handle: object = None

    def view(self, i: int) -> torch.Tensor:
        p = self.params[i]
        return self.buffer[self.offsets[i]: self.offsets[i] + p.numel()].view_as(p)


def _plan_buckets(params: list[nn.Parameter], bucket_bytes: int, first_bucket_bytes: int,
                  dtype: torch.dtype | None = None, apart: set[int] = frozenset()):
    """Groups of parameters (in the given order) whose sizes fit the caps; a parameter
    larger than a cap gets a bucket of its own. `dtype`: the buckets' element type
    (default: each parameter's own); parameters whose id is in `apart` never share a
    bucket with the others (expert weights)."""
    groups: list[list[nn.Parameter]] = []
    open_by_kind: dict[tuple, int] = {}
    sizes: dict[int, int] = {}
    for p in params:
        kind = (dtype or p.dtype, p.device, id(p) in apart)
        nbytes = p.numel() * (dtype or p.dtype).itemsize
        gi = open_by_kind.get(kind)
        cap = first_bucket_bytes if gi == 0 else bucket_bytes
        if gi is None or (sizes[gi] > 0 and sizes[gi] + nbytes > cap):
            groups.append([])
            gi = len(groups) - 1
            open_by_kind[kind] = gi
            sizes[gi] = 0
        groups[gi].append(p)
        sizes[gi] += nbytes
    return groups


class DataParallel(nn.Module):
    """Wraps `module`; see the module docstring. Build with `apply_ddp`."""

    def __init__(self, module: nn.Module, comm: Communicator, *, bucket_mb: float = 25.0,
                 first_bucket_mb: float = 1.0, find_unused_parameters: bool = False,
                 param_dtype: torch.dtype | None = None, reduce_dtype: torch.dtype | None = None,
                 expert_params: list[nn.Parameter] = (), expert_comm: Communicator | None = None,
                 ep_comm: Communicator | None = None):
        super().__init__()
        if bucket_mb <= 0:
            raise ValueError(f"parallel.bucket_mb must be > 0, got {bucket_mb}")
        if first_bucket_mb <= 0:
            raise ValueError(f"parallel.first_bucket_mb must be > 0, got {first_bucket_mb}")
        self.module = module
        self.comm = comm
        self.expert_comm, self.ep_comm = expert_comm, ep_comm
        self._expert_ids = {id(p) for p in expert_params}
        if self._expert_ids and (expert_comm is None or ep_comm is None):
            raise ValueError("expert_params need expert_comm (ranks holding the same experts) and ep_comm "
                             "(ranks holding the other experts)")
        self.find_unused_parameters = find_unused_parameters
        self._sync = True
        self._next_launch = 0
        self._names = {id(p): n for n, p in module.named_parameters()}
        params = [p for p in module.parameters() if p.requires_grad]
        # float32 masters of half parameters, made before the cast so they are exact
        self.master_of: dict[int, nn.Parameter] = {}
        if param_dtype is not None and any(p.dtype != param_dtype for p in params):
            with torch.no_grad():
                for p in params:
                    self.master_of[id(p)] = nn.Parameter(p.detach().float().clone())
                    p.data = p.data.to(param_dtype)
        groups = _plan_buckets(list(reversed(params)), int(bucket_mb * 2**20), int(first_bucket_mb * 2**20),
                               reduce_dtype, self._expert_ids)
        self.buckets: list[GradBucket] = []
        self._slot: dict[int, tuple[int, int]] = {}
        for bi, group in enumerate(groups):
            total = sum(p.numel() for p in group)
            buffer = torch.zeros(total, dtype=reduce_dtype or group[0].dtype, device=group[0].device)
            if id(group[0]) in self._expert_ids:
                bucket = GradBucket(bi, buffer, expert_comm, prescale=1.0 / comm.world_size)
            else:
                bucket = GradBucket(bi, buffer, comm)
            off = 0
            for pi, p in enumerate(group):
                bucket.params.append(p)
                bucket.offsets.append(off)
                off += p.numel()
                self._slot[id(p)] = (bi, pi)
                if bucket.buffer.dtype == p.dtype:
                    p.grad = bucket.view(pi)
                p.register_post_accumulate_grad_hook(self._on_grad_ready)
            self.buckets.append(bucket)
        self._attach_master_grads()

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    # -- gradient accumulation -------------------------------------------
    @contextlib.contextmanager
    def no_sync(self):
        """Micro-steps inside accumulate gradients locally and send nothing."""
        previous, self._sync = self._sync, False
        try:
            yield
        finally:
            self._sync = previous

    def zero_grad(self) -> None:
        """Zeroes every bucket (and re-attaches `.grad` views an optimizer may have dropped)."""
        for b in self.buckets:
            b.buffer.zero_()
            for i, p in enumerate(b.params):
                if b.buffer.dtype != p.dtype:
                    p.grad = None
                elif p.grad is None or p.grad.data_ptr() != b.view(i).data_ptr():
                    p.grad = b.view(i)
        self._attach_master_grads()

    def _attach_master_grads(self) -> None:
        """Masters' .grad: views of float32 buckets; for half buckets, None until
        master_grads() makes float32 copies after the reduction."""
        for b in self.buckets:
            for i, p in enumerate(b.params):
                if id(p) in self.master_of:
                    self.master_of[id(p)].grad = b.view(i) if b.buffer.dtype == torch.float32 else None

    # -- the hook and the launches -----------------------------------------
    def _on_grad_ready(self, p: nn.Parameter) -> None:
        bi, pi = self._slot[id(p)]
        bucket = self.buckets[bi]
        view = bucket.view(pi)
        if bucket.buffer.dtype != p.dtype:  # half gradients into float32 buckets: add, drop
            view.add_(p.grad)
            p.grad = None
        if not self._sync:
            return
        if p.grad is not None and p.grad.data_ptr() != view.data_ptr():  # .grad was replaced: bring it home
            view.copy_(p.grad)
            p.grad = view
        if pi in bucket.ready:
            raise RuntimeError(
                f"parameter {self._names.get(id(p), '?')} got a gradient twice before "
                "finish_gradient_sync(); run backward once per synchronised micro-step "
                "(earlier micro-steps belong inside no_sync())")
        bucket.ready.add(pi)
        self._launch_ready()

    def _launch_ready(self, force: bool = False) -> None:
        while self._next_launch < len(self.buckets):
            bucket = self.buckets[self._next_launch]
            if not force and len(bucket.ready) < len(bucket.params):
                return
            if bucket.prescale != 1.0:  # expert bucket: see the module docstring
                bucket.buffer.mul_(bucket.prescale)
                if bucket.comm.world_size > 1:
                    bucket.handle = bucket.comm.all_reduce(bucket.buffer, op="sum", async_op=True)
            elif bucket.comm.world_size > 1:
                bucket.handle = bucket.comm.all_reduce(bucket.buffer, op="avg", async_op=True)
            self._next_launch += 1

    def finish_gradient_sync(self) -> None:
        """Waits until every bucket is averaged; call after the last micro-step's backward."""
        if not self._sync:
            return
        missing = [self._names.get(id(p), "?") for b in self.buckets
                   for i, p in enumerate(b.params) if i not in b.ready]
        # Launch what is left even when something is missing, so that every rank
        # issues the same collectives and none of them hangs on this one.
        self._launch_ready(force=True)
        for b in self.buckets:
            if b.handle is not None:
                b.handle.wait()
                b.handle = None
            b.ready.clear()
        self._next_launch = 0
        if missing and not self.find_unused_parameters:
            shown = ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else "")
            raise RuntimeError(
                f"{len(missing)} parameter(s) received no gradient this step: {shown}. "
                "If parts of the model are skipped on purpose, set "
                "parallel.find_unused_parameters=true")


    # -- the interface the training loop shares with ZeroModel -------------------------
    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-step's (already 1/grad_accum-scaled) loss; the hooks do the rest."""
        loss.backward()

    def optimizer_step(self) -> None:
        """The optimizer step; with masters, the half parameters are refreshed from them."""
        self.optimizer.step()
        if self.master_of:
            with torch.no_grad():
                params = [p for b in self.buckets for p in b.params]
                torch._foreach_copy_(params, [self.master_of[id(p)] for p in params])

    def _optimized(self) -> list[nn.Parameter]:
        """What the optimizer updates: the masters, or the parameters themselves."""
        params = [p for p in self.module.parameters() if p.requires_grad]
        return [self.master_of[id(p)] for p in params] if self.master_of else params

    def master_grads(self) -> list[torch.Tensor]:
        """The float32 gradients the optimizer will read (after finish_gradient_sync). With
        half buckets the masters' .grad are made here, as float32 copies."""
        if self.master_of:
            for b in self.buckets:
                if b.buffer.dtype != torch.float32:
                    for i, p in enumerate(b.params):
                        m = self.master_of[id(p)]
                        if m.grad is None:
                            m.grad = b.view(i).float()
        return [q.grad for q in self._optimized() if q.grad is not None]

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Global norm of the (already averaged) gradients; clipped in place. Dense gradients
        are replicated; each rank holds only its slice of the expert gradients, whose squares
        are summed over the ep group."""
        self.master_grads()
        if not self._expert_ids:
            return torch.nn.utils.clip_grad_norm_(self._optimized(), max_norm)
        params = [p for p in self.module.parameters() if p.requires_grad]
        opt = self._optimized()
        dense = [q.grad for p, q in zip(params, opt) if id(p) not in self._expert_ids and q.grad is not None]
        expert = [q.grad for p, q in zip(params, opt) if id(p) in self._expert_ids and q.grad is not None]
        sq = lambda gs: sum((g.double().pow(2).sum() for g in gs), torch.zeros((), dtype=torch.float64))  # noqa: E731
        expert_sq = sq(expert).reshape(1).to(opt[0].device)
        self.ep_comm.all_reduce(expert_sq, op="sum")
        norm = (sq(dense).to(expert_sq.device) + expert_sq[0]).sqrt().float()
        if math.isfinite(max_norm):
            coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
            torch._foreach_mul_(dense + expert, coef)
        return norm

    def nonfinite_grad_names(self, limit: int = 8) -> list[str]:
        """Names of the first parameters whose (reduced) gradient holds an inf or nan."""
        out = []
        for b in self.buckets:
            for i, p in enumerate(b.params):
                if not torch.isfinite(b.view(i)).all():
                    out.append(self._names.get(id(p), "?"))
                    if len(out) >= limit:
                        return out
        return out

    def build_optimizer(self, make, param_groups: list[dict]):
        """make(param_groups) -> optimizer over the full parameters (replicated state), or
        over their float32 masters in mixed precision."""
        if self.master_of:
            param_groups = [dict(g, params=[self.master_of[id(p)] for p in g["params"]]) for g in param_groups]
        self.optimizer = make(param_groups)
        return self.optimizer

    @torch.no_grad()
    def consolidated_state_dict(self) -> dict | None:
        """Collective: the model's state_dict with float32 master values in place of half
        parameters, expert weights gathered from the ep group (experts in order); a copy on
        rank 0, None elsewhere."""
        full: dict[int, torch.Tensor] = {}
        for p in self.module.parameters():  # the same order on every rank
            if id(p) in self._expert_ids:
                local = self.master_of.get(id(p), p).detach().contiguous()
                out = local.new_empty((local.shape[0] * self.ep_comm.world_size, *local.shape[1:]))
                self.ep_comm.all_gather(out.view(-1), local.view(-1))
                full[id(p)] = out
        if self.comm.rank != 0:
            return None
        return {k: full[id(v)] if id(v) in full else self.master_of.get(id(v), v).detach().clone()
                for k, v in self.module.state_dict(keep_vars=True).items()}

    def after_step(self) -> None:
        """Nothing to do: every rank applied the same update to its full copy."""

    def _optimizer_file(self) -> str:
        """optimizer.pt (replicated state), or optimizer_ep<r>.pt per set of experts."""
        return f"optimizer_ep{self.ep_comm.rank}.pt" if self._expert_ids else "optimizer.pt"

    def save_optimizer(self, ckpt_dir) -> None:
        """Rank 0 writes <ckpt_dir>/optimizer.pt (the state is replicated); with experts, the
        first replica of each ep rank writes optimizer_ep<r>.pt (its experts' state differs)."""
        writer = self.expert_comm.rank == 0 if self._expert_ids else self.comm.rank == 0
        if writer:
            atomic_write(Path(ckpt_dir) / self._optimizer_file(), lambda fh: torch.save(self.optimizer.state_dict(), fh))

    def load_optimizer(self, ckpt_dir) -> None:
        path = Path(ckpt_dir) / self._optimizer_file()
        if not path.is_file():
            raise ValueError(f"trainer.resume: {path} is missing (saved with another parallel.ep_size?)")
        device = next(self.module.parameters()).device
        self.optimizer.load_state_dict(torch.load(path, map_location=device, weights_only=True))

    def gathered(self):
        """Full parameters are always here."""
        return contextlib.nullcontext()

    def model_state_bytes(self) -> dict[str, int]:
        """Per-rank bytes of parameters, gradients (the buckets) and optimizer states."""
        params = sum(p.numel() * p.element_size() for p in self.module.parameters())
        grads = sum(b.buffer.numel() * b.buffer.element_size() for b in self.buckets)
        masters = sum(m.numel() * m.element_size() for m in self.master_of.values())  # K counts them
        return {"params": params, "grads": grads,
                "optimizer": masters + optimizer_state_bytes(getattr(self, "optimizer", None))}


def optimizer_state_bytes(optimizer) -> int:
    """Bytes of an optimizer's per-parameter state tensors (Adam's moments); scalars such as
    the step count are not counted. 0 before the optimizer exists."""
    if optimizer is None:
        return 0
    return sum(t.numel() * t.element_size() for state in optimizer.state.values() for t in state.values()
               if torch.is_tensor(t) and t.dim() > 0)


@torch.no_grad()
def broadcast_module_state(module: nn.Module, comm: Communicator, *, expert_params: list[nn.Parameter] = (),
                           expert_comm: Communicator | None = None) -> None:
    """Makes every rank's parameters and buffers equal to its group's first rank's, one
    message per dtype: over `comm`, except `expert_params` (each rank's slice of the
    experts, after apply_expert_parallel), which go over `expert_comm`, the ranks that
    hold the same experts."""
    experts = {id(p) for p in expert_params}
    _broadcast([t for t in list(module.parameters()) + list(module.buffers()) if id(t) not in experts], comm)
    if experts:
        _broadcast(list(expert_params), expert_comm)


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


def apply_ddp(model: nn.Module, group=None, *, algorithm: str = "ring", bucket_mb: float = 25.0,
              first_bucket_mb: float = 1.0, find_unused_parameters: bool = False,
              param_dtype: torch.dtype | None = None, reduce_dtype: torch.dtype | None = None,
              expert_params: list[nn.Parameter] = (), expert_comm: Communicator | None = None,
              ep_comm: Communicator | None = None, comm: Communicator | None = None) -> DataParallel:
    """Replicates `model` over `group`: rank 0's weights are broadcast, then gradients
    are averaged in overlapped buckets with the collective `algorithm`. `param_dtype`
    half: parameters cast to it, float32 masters kept; `reduce_dtype`: the buckets'.
    `expert_params` (after apply_expert_parallel): replicated and reduced over
    `expert_comm` only; `ep_comm` gathers them for consolidated checkpoints."""
    comm = comm or Communicator(group, algorithm=algorithm)
    broadcast_module_state(model, comm, expert_params=expert_params, expert_comm=expert_comm)
    return DataParallel(model, comm, bucket_mb=bucket_mb, first_bucket_mb=first_bucket_mb,
                        find_unused_parameters=find_unused_parameters, param_dtype=param_dtype,
                        reduce_dtype=reduce_dtype, expert_params=expert_params, expert_comm=expert_comm,
                        ep_comm=ep_comm)
