"""Expert parallelism: each MoE layer keeps a contiguous slice of its experts and exchanges tokens
with all-to-all through ringtrain's collective library.

`apply_expert_parallel(model, ep_group)` changes the model in place: in every MoE layer
(models/moe.py) ep rank r keeps experts [r*E/ep, (r+1)*E/ep) and gets a dispatcher. A forward
of one layer then runs:

1. routing and capacity dropping on the source rank, as in the local layer (so capacity is per
   source rank and expert, and the drop decisions are the local layer's on this rank's tokens);
   the kept rows come sorted by global expert, hence grouped by destination rank;
2. an all-to-all of the per-expert counts (E int64 entries, E/ep per destination), so every rank
   knows how many rows each peer sends to each of its local experts;
3. an all-to-all of the rows with those split sizes; they arrive ordered (source, local expert)
   and are regrouped to (local expert, source) so each local expert runs one matmul pair over
   all its rows from all ranks;
4. the reverse all-to-all brings the results home in the order they left; the layer combines
   them with the router weights.

The row all-to-alls are autograd Functions whose backward is the reverse all-to-all, so input,
router and expert gradients flow as in the local layer. An expert's weight gradient on rank r
sums over the tokens of every ep rank; averaging it further over data-parallel replicas of the
same experts (the mesh's expert_dp group) is the data-parallel wrapper's job, which finds the expert
weights through the same duck-typed layers (parallel/flat_model.py `find_expert_parameters`). The
router stays replicated.

All traffic (counts and rows, forward and backward) goes through the one Communicator given, so its
`stats` (bytes_sent, wait_s, calls) are the MoE all-to-all's.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .collectives import Communicator


def check_expert_parallel(num_experts: int, ep_size: int) -> None:
    """Config-time check: raises ValueError naming both keys unless ep_size divides num_experts."""
    if ep_size < 1:
        raise ValueError(f"parallel.ep_size must be >= 1, got {ep_size}")
    if ep_size > 1 and num_experts < 1:
        raise ValueError(f"parallel.ep_size={ep_size} needs MoE layers; model.moe.num_experts is {num_experts}")
    if num_experts % ep_size:
        raise ValueError(f"model.moe.num_experts={num_experts} must be divisible by parallel.ep_size={ep_size}")


def _all_to_all_rows(comm: Communicator, x: torch.Tensor, send_rows: list[int], recv_rows: list[int]):
    x = x.contiguous()
    width = math.prod(x.shape[1:])
    out = x.new_empty((sum(recv_rows), *x.shape[1:]))
    comm.all_to_all(out, x, output_split_sizes=[n * width for n in recv_rows],
                    input_split_sizes=[n * width for n in send_rows])
    return out


class AllToAllRows(torch.autograd.Function):
    """Rows send_rows[j] of x go to rank j; recv_rows[i] rows come from rank i. Backward: the reverse.

    The backward is a collective too: x must require grad on every ep rank or on none (in a
    model the MoE input always does), or the ranks' backward passes would not pair up.
    """

    @staticmethod
    def forward(ctx, x, comm, send_rows, recv_rows):
        ctx.comm, ctx.send_rows, ctx.recv_rows = comm, send_rows, recv_rows
        return _all_to_all_rows(comm, x, send_rows, recv_rows)

    @staticmethod
    def backward(ctx, grad):
        return _all_to_all_rows(ctx.comm, grad, ctx.recv_rows, ctx.send_rows), None, None, None


class ExpertDispatch:
    """The MoE layer's `dispatch` under expert parallelism (see the module docstring for the steps)."""

    def __init__(self, comm: Communicator, num_experts: int):
        self.comm = comm
        self.ep = comm.world_size
        self.num_local = num_experts // self.ep

    def __deepcopy__(self, memo):  # a copied model talks over the same group; process groups do not copy
        return self

    def __call__(self, x_sorted, counts, run_local_experts):
        ep, n_local = self.ep, self.num_local
        counts = counts.to(torch.int64).contiguous()
        recv_counts = torch.empty_like(counts)            # [s*n_local + e]: rows from rank s for local expert e
        self.comm.all_to_all(recv_counts, counts)
        recv = recv_counts.view(ep, n_local)
        send_rows = counts.view(ep, n_local).sum(1).tolist()
        recv_rows = recv.sum(1).tolist()
        x_recv = AllToAllRows.apply(x_sorted, self.comm, send_rows, recv_rows)
        # Regroup (source, expert) -> (expert, source): a stable sort of each row's segment key.
        seg = torch.repeat_interleave(torch.arange(ep * n_local, device=recv.device), recv.reshape(-1))
        perm = torch.sort((seg % n_local) * ep + seg // n_local, stable=True).indices
        y_local = run_local_experts(x_recv[perm], recv.sum(0).tolist())
        inverse = torch.empty_like(perm)
        inverse[perm] = torch.arange(perm.numel(), device=perm.device)
        return AllToAllRows.apply(y_local[inverse], self.comm, recv_rows, send_rows)


def apply_expert_parallel(model: nn.Module, comm: Communicator) -> None:
    """Shards the experts of every MoE layer of `model` over the ranks of `comm` (the ep group) and
    routes their tokens by all-to-all through it; ep rank r keeps experts [r*E/ep, (r+1)*E/ep).
    Sends nothing itself: every rank must hold the same full set of experts before the call (same
    seed). `comm.stats` then counts the MoE all-to-all traffic."""
    ep_size = comm.world_size
    # Duck-typed (parallel never imports models, docs/design.md): an MoE layer is what has shard_experts.
    layers = [m for m in model.modules() if callable(getattr(m, "shard_experts", None))]
    for E in {layer.num_experts for layer in layers} or {0}:
        check_expert_parallel(E, ep_size)
    for layer in layers:
        n_local = layer.num_experts // ep_size
        layer.shard_experts(comm.rank * n_local, n_local, ExpertDispatch(comm, layer.num_experts))
