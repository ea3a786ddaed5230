"""Data-parallel cases run inside the shared worker pools (see harness.py)."""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from parallel.collectives import Communicator
from parallel.data_parallel import apply_ddp
from parallel.mesh import Comms


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
    torch.manual_seed(100)
    ref = Net()                                  # rank 0's initial weights, built before the wrapper
    torch.manual_seed(100 + rank)                # different init per rank: broadcast must fix it
    model = Net()
    comm = Communicator(None, algorithm=algorithm)
    ddp = apply_ddp(model, Comms(dp=comm), bucket_mb=bucket_mb, first_bucket_mb=first_bucket_mb)
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
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=5e-8)  # measured: <= 7.8e-9
            max_grad_err = max(max_grad_err, (p.grad - q.grad).abs().max().item())
        opt.step()
        ref_opt.step()
        ddp.zero_grad()
        ref_opt.zero_grad()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=5e-8)
    comm.close()
    return {"calls_in_no_sync": calls_in_no_sync, "buckets": len(ddp.units), "max_grad_err": max_grad_err,
            "weights": torch.cat([p.detach().reshape(-1).double() for p in model.parameters()])}


def ddp_unused(rank: int, world: int, find_unused: bool, steps: int = 2, accum: int = 2, per_rank: int = 2) -> dict:
    """A parameter without gradient: an error naming it, never a hang; or, with the flag,
    every gradient (the unused one zero) and the weights after `steps` SGD steps of `accum`
    micro-steps equal a single-process model trained on the global batches (built before the
    wrapper with rank 0's weights; its unused parameter, which gets no .grad, counts as zero)."""
    torch.manual_seed(10)
    ref = Net(with_unused=True)
    torch.manual_seed(10 + rank)                 # different per rank: the broadcast must fix it
    model = Net(with_unused=True)
    comm = Communicator(None)
    ddp = apply_ddp(model, Comms(dp=comm), bucket_mb=0.01, first_bucket_mb=0.002, find_unused_parameters=find_unused)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    loss_fn = nn.CrossEntropyLoss()
    names = [n for n, _ in ref.named_parameters()]
    out = {"error": None, "unused_grad_abs": 0.0, "max_grad_err": 0.0}
    for step in range(steps):
        for micro in range(accum):
            x, y = _batches(step, micro, world, per_rank)
            mine = slice(rank * per_rank, (rank + 1) * per_rank)
            ctx = ddp.no_sync() if micro < accum - 1 else contextlib.nullcontext()
            with ctx:
                (loss_fn(ddp(x[mine]), y[mine]) / accum).backward()
            (loss_fn(ref(x), y) / accum).backward()
        try:
            ddp.finish_gradient_sync()
        except RuntimeError as e:
            comm.close()
            return {"error": str(e)}
        for name, p, q in zip(names, model.parameters(), ref.parameters()):
            want = q.grad if q.grad is not None else torch.zeros_like(q)
            out["max_grad_err"] = max(out["max_grad_err"], (p.grad - want).abs().max().item())
            torch.testing.assert_close(p.grad, want, rtol=1e-6, atol=5e-8, msg=lambda m, name=name: f"{name}: {m}")
        out["unused_grad_abs"] += sum(p.grad.abs().sum().item() for p in model.unused.parameters())
        opt.step()
        ref_opt.step()
        ddp.zero_grad()
        ref_opt.zero_grad()
    for name, p, q in zip(names, model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=5e-8, msg=lambda m, name=name: f"{name}: {m}")
    comm.close()
    return out


def ddp_overlap(rank: int, world: int) -> list[str]:
    """Order of events in one backward: bucket launches against the first layer's backward."""
    torch.manual_seed(0)
    model = Net()
    events: list[str] = []
    ddp = apply_ddp(model, Comms(dp=Communicator(None, algorithm="ring")), bucket_mb=0.004, first_bucket_mb=0.001)
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
