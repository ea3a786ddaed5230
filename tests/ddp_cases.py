"""Data-parallel cases run inside the shared worker pools (see harness.py)."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from parallel.collectives import Communicator
from parallel.data_parallel import apply_ddp


class Net(nn.Module):
    """Several layers (several buckets), a float64 layer (its own bucket kind), and an
    optional branch that receives no gradient."""

    def __init__(self, with_unused: bool = False):
        super().__init__()
        self.embed = nn.Embedding(32, 16)
        self.l1 = nn.Linear(16, 64)
        self.l2 = nn.Linear(64, 64)
        self.l3 = nn.Linear(64, 32)
        self.head64 = nn.Linear(32, 4).double()
        self.unused = nn.Linear(8, 8) if with_unused else None

    def forward(self, idx):                      # (B, T) int64
        h = self.embed(idx).mean(1)              # (B, 16)
        h = torch.tanh(self.l3(torch.relu(self.l2(torch.relu(self.l1(h))))))
        return self.head64(h.double()).float()   # (B, 4)


def _batches(step: int, micro: int, world: int, per_rank: int):
    g = torch.Generator().manual_seed(1000 * step + micro)
    x = torch.randint(0, 32, (world * per_rank, 5), generator=g)
    y = torch.randint(0, 4, (world * per_rank,), generator=g)
    return x, y


def ddp_matches_reference(rank: int, world: int, algorithm: str, bucket_mb: float, first_bucket_mb: float,
                          accum: int, steps: int = 2, per_rank: int = 3) -> dict:
    """DDP gradients and weights after `steps` SGD steps with `accum` micro-steps equal a
    single-process model trained on the concatenated global batches."""
    torch.manual_seed(100 + rank)                # different init per rank: broadcast must fix it
    model = Net()
    comm = Communicator(None, algorithm=algorithm)
    ddp = apply_ddp(model, bucket_mb=bucket_mb, first_bucket_mb=first_bucket_mb, comm=comm)
    ref = copy.deepcopy(model)                   # rank 0's weights after the broadcast
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    loss_fn = nn.CrossEntropyLoss()
    calls_in_no_sync = 0
    max_grad_err = 0.0
    for step in range(steps):
        for micro in range(accum):
            x, y = _batches(step, micro, world, per_rank)
            mine = slice(rank * per_rank, (rank + 1) * per_rank)
            last = micro == accum - 1
            before = comm.stats.calls
            if last:
                (loss_fn(ddp(x[mine]), y[mine]) / accum).backward()
            else:
                with ddp.no_sync():
                    (loss_fn(ddp(x[mine]), y[mine]) / accum).backward()
                calls_in_no_sync += comm.stats.calls - before
            (loss_fn(ref(x), y) / accum).backward()
        ddp.finish_gradient_sync()
        for p, q in zip(model.parameters(), ref.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6)
            max_grad_err = max(max_grad_err, (p.grad - q.grad).abs().max().item())
        opt.step()
        ref_opt.step()
        ddp.zero_grad()
        ref_opt.zero_grad()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    comm.close()
    return {"calls_in_no_sync": calls_in_no_sync, "buckets": len(ddp.buckets), "max_grad_err": max_grad_err,
            "weights": torch.cat([p.detach().reshape(-1).double() for p in model.parameters()])}


def ddp_unused(rank: int, world: int, find_unused: bool) -> dict:
    """A parameter without gradient: an error naming it, or (flag) zeros averaged, never a hang."""
    torch.manual_seed(0)
    model = Net(with_unused=True)
    ddp = apply_ddp(model, algorithm="ring", bucket_mb=0.01, find_unused_parameters=find_unused)
    x, y = _batches(0, 0, world, 2)
    nn.CrossEntropyLoss()(ddp(x), y).backward()
    try:
        ddp.finish_gradient_sync()
    except RuntimeError as e:
        ddp.comm.close()
        return {"error": str(e)}
    out = {"error": None, "unused_grad_abs": model.unused.weight.grad.abs().sum().item(),
           "l1_grad": model.l1.weight.grad.clone()}
    ddp.comm.close()
    return out


def ddp_overlap(rank: int, world: int) -> list[str]:
    """Order of events in one backward: bucket launches against the first layer's backward."""
    torch.manual_seed(0)
    model = Net()
    events: list[str] = []
    ddp = apply_ddp(model, algorithm="ring", bucket_mb=0.004, first_bucket_mb=0.001)
    real = ddp.comm.all_reduce

    def recording(tensor, **kw):
        events.append("launch")
        return real(tensor, **kw)

    ddp.comm.all_reduce = recording
    model.l1.register_full_backward_hook(lambda *a: events.append("l1_backward"))
    x, y = _batches(0, 0, world, 2)
    nn.CrossEntropyLoss()(ddp(x), y).backward()
    ddp.finish_gradient_sync()
    ddp.comm.close()
    return events
