"""What the model state of a data-parallel wrapper really occupies, measured from storage.

`model_state_bytes()` on DataParallel and ZeroModel computes bytes from shard sizes: it says
what a rank *should* hold. `measured_model_state_bytes(wrapper)` looks at what is allocated:
the untyped storages behind every tensor of the model state, each storage counted once
(whatever views point into it, and whether they are contiguous parts of it or not). A
ZeRO-3 that forgets to free a gathered unit, a wrapper that keeps a stray gradient copy or
an optimizer that holds full-size state shows up here and not in the computed figure.

Counted, per rank, in this order; a storage reached again later is not counted again:

- ``params``: the storages of the wrapped module's parameters (``wrapper.module.parameters()``);
  under ZeRO also every unit's flat ``full`` buffer (the parameters are views into it; a
  stage-3 unit outside forward/backward has resized it to 0 bytes) and, in stage 3, the
  persistent gather source of each unit: its half shard in mixed precision, else its float32
  shard (the only persistent copy of the weights).
- ``grads``: the ``.grad`` of every module parameter; every unit's whole-gradient buffer
  ``grad_full`` (DDP's buckets, ZeRO-1) or ``grad_shard`` (ZeRO-2/3), and the
  ``.grad`` of every tensor the optimizer updates (masters / shards: views of the above, or
  float32 copies made by ``master_grads()`` when gradients travel in half precision).
- ``staging``: ZeroModel stage 2/3 transient gradient buffers still allocated: the staging
  pool (at most ``GradSync.staging_buffers`` per dtype, each the size of the largest unit, kept
  between steps for reuse) plus any unit's ``staging`` / ``incoming`` buffer. Not part of
  the model-state formula in docs/design.md; reported apart so a test can bound it.
- ``optimizer``: every tensor the optimizer updates that was not reached above (DataParallel's
  float32 masters in mixed precision; ZeroModel's float32 master shards when they are not
  views of the parameters) and every tensor in ``optimizer.state`` (Adam's moments and its
  step counters, scalars included). 0 before ``build_optimizer`` / the first step for state.

``total`` is the sum of the four. Not counted: module buffers (RoPE tables and the like),
activations, autograd's saved tensors, communication scratch. On CUDA the result also holds
``cuda_allocated``: ``torch.cuda.memory_allocated`` of the parameters' device, everything the
caching allocator has handed out there (not only model state), for comparison.
"""

from __future__ import annotations

import resource

import torch


def _storage_key_and_bytes(t: torch.Tensor) -> tuple[int, int]:
    s = t.untyped_storage()
    return s._cdata, s.nbytes()


class _Counter:
    def __init__(self):
        self.seen: set[int] = set()
        self.bytes: dict[str, int] = {}

    def add(self, kind: str, tensors) -> None:
        total = self.bytes.setdefault(kind, 0)
        for t in tensors:
            if t is None or not torch.is_tensor(t):
                continue
            key, nbytes = _storage_key_and_bytes(t.detach())
            if key in self.seen:
                continue
            self.seen.add(key)
            total += nbytes
        self.bytes[kind] = total


def measured_model_state_bytes(wrapper) -> dict[str, int]:
    """Per-rank bytes really allocated for `wrapper`'s model state (a DataParallel or a
    ZeroModel): {"params", "grads", "staging", "optimizer", "total"} (+ "cuda_allocated" on
    CUDA). See the module docstring for exactly what each entry counts. Local: no collective."""
    from .flat_model import FlatParamModel

    if not isinstance(wrapper, FlatParamModel):
        raise TypeError(f"measured_model_state_bytes needs a DataParallel or ZeroModel, got {type(wrapper).__name__}")
    c = _Counter()
    params = list(wrapper.module.parameters())
    optimizer = getattr(wrapper, "optimizer", None)
    optimized = [q for g in optimizer.param_groups for q in g["params"]] if optimizer is not None else []

    c.add("params", params)
    c.add("params", [u.full for u in wrapper.units])
    if getattr(wrapper, "gather", None) is not None:  # ZeRO-3: the persistent gather sources
        c.add("params", [u.half_shard if u.half_shard is not None else u.shard for u in wrapper.units])

    c.add("grads", [p.grad for p in params])
    c.add("grads", [u.grad_full for u in wrapper.units] + [u.grad_shard for u in wrapper.units])
    c.add("grads", [q.grad for q in optimized])

    c.add("staging", list(wrapper.grad_sync.pool) + [u.staging for u in wrapper.units]
          + [u.incoming for u in wrapper.units])

    c.add("optimizer", optimized)
    if optimizer is not None:
        c.add("optimizer", [t for state in optimizer.state.values() for t in state.values()])

    out = {k: c.bytes[k] for k in ("params", "grads", "staging", "optimizer")}
    out["total"] = sum(out.values())
    device = params[0].device if params else torch.device("cpu")
    if device.type == "cuda":
        out["cuda_allocated"] = int(torch.cuda.memory_allocated(device))
    return out


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process: allocated on CUDA (since the last reset), resident set on CPU
    (since the process started: the operating system keeps no resettable peak)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
