"""The flat-parameter layer's unit: a run of parameters whose gradients travel as one flat buffer.

DDP and every ZeRO stage cut the trainable parameters into `FlatUnit`s. A unit holds
parameters of one dtype and device (and, under ZeRO, of one optimizer group), never
mixes expert weights with dense ones, and owns:

- its gradient buffer, in the gradient-communication dtype: the whole flat gradient
  (`grad_full`, DDP and ZeRO-1; each parameter's `.grad` is a view into it when the
  dtypes agree) or only this rank's reduced shard (`grad_shard`, ZeRO-2/3);
- under ZeRO, the parameters themselves packed into one flat buffer (`full`, padded to
  a multiple of the group size and cut into equal shards; rank r owns shard r) and the
  shard the optimizer updates (`shard`: a view into `full`, or a float32 master copy);
- the bookkeeping of one reduction in flight (ready parameters, handle, staging buffer).

The optimizer never sees a unit: it sees "optimized tensors" (`FlatParamModel.optimized`),
per parameter under DDP (the parameter or its float32 master), per unit under ZeRO (the
shard), each paired with the reduced gradient it reads (`reduced_grad`).

Units are planned by `plan_buckets` in reverse registration order (roughly the order
backward finishes gradients), capped at a byte size so communication starts early.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .collectives import Communicator


def plan_buckets(params: list[nn.Parameter], bucket_bytes: int, first_bucket_bytes: int,
                 dtype: torch.dtype | None = None, apart: set[int] = frozenset()) -> list[list[nn.Parameter]]:
    """Groups of parameters (in the given order) whose sizes fit the caps; a parameter larger
    than a cap gets a group of its own. `dtype`: the gradient buffers' element type (default:
    each parameter's own); parameters whose id is in `apart` (expert weights) never share a
    group with the others, nor do parameters of different dtypes or devices."""
    groups: list[list[nn.Parameter]] = []
    open_by_kind: dict[tuple, int] = {}
    sizes: dict[int, int] = {}
    for p in params:
        kind = (dtype or p.dtype, p.dtype, p.device, id(p) in apart)
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


@dataclass(eq=False)
class FlatUnit:
    """One flat run of parameters and its gradients; see the module docstring."""

    index: int
    params: list[nn.Parameter]
    comm: Communicator               # the ranks its gradients are reduced (and, ZeRO, sharded) over
    grad_dtype: torch.dtype
    sharded: bool                    # ZeRO: padded to the group size, this rank owns one shard
    expert: bool = False             # an expert slice's weights (reduced over its replicas only)
    world_size: int = 1              # all ranks: expert gradients are pre-scaled by 1 / world_size
    group: int = -1                  # ZeRO: the optimizer group of every parameter in it
    block: int = -1                  # ZeRO-3: index of the block it belongs to; -1 = the root unit
    offsets: list[int] = field(default_factory=list)
    numel: int = 0
    padded: int = 0
    grad_full: torch.Tensor | None = None   # (padded,) whole gradient
    grad_shard: torch.Tensor | None = None  # (S,) this rank's reduced gradient shard
    full: torch.Tensor | None = None        # ZeRO: (padded,) parameters in compute dtype (ZeRO-3: freed when idle)
    shard: nn.Parameter | None = None       # ZeRO: (S,) what the optimizer updates
    half_shard: torch.Tensor | None = None  # ZeRO-3 mixed precision: this rank's shard in compute dtype
    # one reduction in flight
    ready: set[int] = field(default_factory=set)
    handle: object = None
    staging: torch.Tensor | None = None
    incoming: torch.Tensor | None = None
    handle_order: int = 0

    def __post_init__(self):
        off = 0
        for q in self.params:
            self.offsets.append(off)
            off += q.numel()
        self.numel = off
        p = self.comm.world_size if self.sharded else 1
        self.padded = -(-off // p) * p

    # -- geometry ------------------------------------------------------------
    @property
    def S(self) -> int:
        """Shard length (the whole unit when not sharded)."""
        return self.padded // (self.comm.world_size if self.sharded else 1)

    @property
    def mine(self) -> slice:
        """This rank's shard within the padded unit."""
        r = self.comm.rank if self.sharded else 0
        return slice(r * self.S, (r + 1) * self.S)

    def slot(self, i: int) -> slice:
        return slice(self.offsets[i], self.offsets[i] + self.params[i].numel())

    def grad_view(self, i: int) -> torch.Tensor:
        """Parameter i's slot in the whole-gradient buffer, shaped like the parameter."""
        return self.grad_full[self.slot(i)].view_as(self.params[i])

    def owner_of(self, position: int) -> int | None:
        """Index of the parameter holding element `position` of the padded unit; None for padding."""
        if position >= self.numel:
            return None
        return max(i for i, off in enumerate(self.offsets) if off <= position)

    @property
    def reduce(self) -> tuple[float, str]:
        """(pre-scale, op): dense gradients are averaged over `comm`; an expert's local gradient
        already sums its ep group's tokens, so it is scaled by 1 / world and summed over the
        replicas, which gives the same average over every rank's tokens."""
        return (1.0 / self.world_size, "sum") if self.expert else (1.0, "avg")

    # -- gradient buffers ------------------------------------------------------
    def make_grad_buffer(self, whole: bool) -> None:
        """Allocates the whole-gradient buffer (whole) or the reduced-shard buffer, zeroed."""
        device = self.params[0].device
        if whole:
            self.grad_full = torch.zeros(self.padded, dtype=self.grad_dtype, device=device)
        else:
            self.grad_shard = torch.zeros(self.S, dtype=self.grad_dtype, device=device)
        self.attach_param_grads()

    def attach_param_grads(self) -> None:
        """Parameters' .grad: views into the whole buffer when the dtypes agree (autograd then
        accumulates straight into what is sent); otherwise None (the hook adds them in)."""
        for i, q in enumerate(self.params):
            if self.grad_full is None or self.grad_full.dtype != q.dtype:
                q.grad = None
            elif q.grad is None or q.grad.data_ptr() != self.grad_view(i).data_ptr():
                q.grad = self.grad_view(i)

    def zero_grad(self) -> None:
        if self.grad_full is not None:
            self.grad_full.zero_()
        else:
            self.grad_shard.zero_()
        self.attach_param_grads()

    @property
    def reduced_grad(self) -> torch.Tensor:
        """ZeRO: this rank's reduced gradient shard (a view of the whole buffer under ZeRO-1)."""
        return self.grad_full[self.mine] if self.grad_full is not None else self.grad_shard

    def nbytes(self, t: torch.Tensor | None) -> int:
        return 0 if t is None else t.numel() * t.element_size()
