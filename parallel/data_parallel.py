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
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from .collectives import Communicator


@dataclass
class GradBucket:
    """A flat gradient buffer shared by a run of parameters of one dtype and device."""

    index: int
    buffer: torch.Tensor
    params: list[nn.Parameter] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    ready: set[int] = field(default_factory=set)
    handle: object = None

    def view(self, i: int) -> torch.Tensor:
        p = self.params[i]
        return self.buffer[self.offsets[i]: self.offsets[i] + p.numel()].view_as(p)


def _plan_buckets(params: list[nn.Parameter], bucket_bytes: int, first_bucket_bytes: int,
                  dtype: torch.dtype | None = None):
    """Groups of parameters (in the given order) whose sizes fit the caps; a parameter
    larger than a cap gets a bucket of its own. `dtype`: the buckets' element type
    (default: each parameter's own)."""
    groups: list[list[nn.Parameter]] = []
    open_by_kind: dict[tuple, int] = {}
    sizes: dict[int, int] = {}
    for p in params:
        kind = (dtype or p.dtype, p.device)
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
                 param_dtype: torch.dtype | None = None, reduce_dtype: torch.dtype | None = None):
        super().__init__()
        if bucket_mb <= 0:
            raise ValueError(f"parallel.bucket_mb must be > 0, got {bucket_mb}")
        if first_bucket_mb <= 0:
            raise ValueError(f"parallel.first_bucket_mb must be > 0, got {first_bucket_mb}")
        self.module = module
        self.comm = comm
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
                               reduce_dtype)
        self.buckets: list[GradBucket] = []
        self._slot: dict[int, tuple[int, int]] = {}
        for bi, group in enumerate(groups):
            total = sum(p.numel() for p in group)
            bucket = GradBucket(bi, torch.zeros(total, dtype=reduce_dtype or group[0].dtype, device=group[0].device))
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
            if self.comm.world_size > 1:
                bucket.handle = self.comm.all_reduce(bucket.buffer, op="avg", async_op=True)
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
        """Global norm of the (already averaged, replicated) gradients; clipped in place."""
        self.master_grads()
        return torch.nn.utils.clip_grad_norm_(self._optimized(), max_norm)

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
        """Collective (trivially here): the model's state_dict with float32 master values in
        place of half parameters; a copy on rank 0, None elsewhere."""
        if self.comm.rank != 0:
            return None
        return {k: self.master_of.get(id(v), v).detach().clone()
                for k, v in self.module.state_dict(keep_vars=True).items()}

    def after_step(self) -> None:
        """Nothing to do: every rank applied the same update to its full copy."""

    def save_optimizer(self, ckpt_dir) -> None:
        """Rank 0 writes <ckpt_dir>/optimizer.pt (the state is replicated)."""
        if self.comm.rank == 0:
            tmp = Path(ckpt_dir) / "optimizer.pt.part"
            with open(tmp, "wb") as fh:
                torch.save(self.optimizer.state_dict(), fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, Path(ckpt_dir) / "optimizer.pt")

    def load_optimizer(self, ckpt_dir) -> None:
        path = Path(ckpt_dir) / "optimizer.pt"
        if not path.is_file():
            raise ValueError(f"trainer.resume: {path} is missing")
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
def broadcast_module_state(module: nn.Module, comm: Communicator, src: int = 0) -> None:
    """Makes every rank's parameters and buffers equal to rank `src`'s, one message per dtype."""
    if comm.world_size == 1:
        return
    tensors = list(module.parameters()) + list(module.buffers())
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
              comm: Communicator | None = None) -> DataParallel:
    """Replicates `model` over `group`: rank 0's weights are broadcast, then gradients
    are averaged in overlapped buckets with the collective `algorithm`. `param_dtype`
    half: parameters cast to it, float32 masters kept; `reduce_dtype`: the buckets'."""
    comm = comm or Communicator(group, algorithm=algorithm)
    broadcast_module_state(model, comm)
    return DataParallel(model, comm, bucket_mb=bucket_mb, first_bucket_mb=first_bucket_mb,
                        find_unused_parameters=find_unused_parameters, param_dtype=param_dtype,
                        reduce_dtype=reduce_dtype)
