"""What the training-throughput benchmarks share: one model and one batch per rank, and a
timed run of steps that ends when the slowest rank ends."""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from models.config import AttentionConfig, ModelConfig
from models.transformer import DecoderLM


def model_and_batch(a, rank: int, device: torch.device):
    """The benchmark's DecoderLM (seed 0: the same weights on every rank and for every
    engine) and this rank's (x, y) batch of a.batch x a.seq_len tokens (each rank its own)."""
    torch.manual_seed(0)
    model = DecoderLM(ModelConfig(seq_len=a.seq_len, d_model=a.d_model, n_layers=a.n_layers, n_heads=a.n_heads),
                      AttentionConfig(kind=a.attention)).to(device)
    g = torch.Generator().manual_seed(1 + rank)
    x = torch.randint(0, 256, (a.batch, a.seq_len), generator=g).to(device)
    y = torch.randint(0, 256, (a.batch, a.seq_len), generator=g).to(device)
    return model, x, y


def timed_steps(step, x, y, *, warmup: int, steps: int, device: torch.device):
    """Runs `warmup` untimed then `steps` timed calls of step(x, y); returns (seconds of the
    slowest rank, the last call's result)."""
    for _ in range(warmup):
        step(x, y)
    dist.barrier()
    t0 = time.perf_counter()
    out = None
    for _ in range(steps):
        out = step(x, y)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = torch.tensor([time.perf_counter() - t0], dtype=torch.float64, device=device)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # a step ends when the slowest rank ends
    return elapsed.item(), out
