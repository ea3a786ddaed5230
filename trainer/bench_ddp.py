"""Training throughput of ringtrain's data parallelism against torch's DistributedDataParallel.

    torchrun --standalone --nproc_per_node=2 -m trainer.bench_ddp --algorithms ring,native

Same model (same initial weights), same batch, same ranks, same optimizer, in one run.
Engines are interleaved trial by trial (A B C A B C ...), so slow phases of a shared
machine hit all of them alike; the figure is the median tokens/s over trials and its
ratio to torch DDP.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from parallel.collectives import Communicator
from parallel.data_parallel import apply_ddp
from parallel.process_group import init_distributed, shutdown

from .bench_common import model_and_batch, timed_steps


def _args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("--algorithms", default="ring,native", help="ringtrain all-reduce algorithms to compare")
    ap.add_argument("--attention", default="softmax")
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--n-layers", type=int, default=4)
    ap.add_argument("--n-heads", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16, help="sequences per rank per step")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per trial")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--bucket-mb", type=float, default=25.0)
    ap.add_argument("--out", default=None, help="folder for ddp_bench.json (rank 0)")
    a = ap.parse_args()
    for k in ("steps", "trials", "batch", "seq_len"):
        if getattr(a, k) < 1:
            ap.error(f"--{k.replace('_', '-')} must be >= 1")
    return a


def _engines(base: torch.nn.Module, algorithms: list[str], bucket_mb: float, device):
    """name -> step function, and the communicators to close at the end"""
    engines, comms = {}, []
    for algo in algorithms:
        model = copy.deepcopy(base)
        comms.append(Communicator(None, algorithm=algo))
        ddp = apply_ddp(model, comm=comms[-1], bucket_mb=bucket_mb)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step(x, y, ddp=ddp, opt=opt):
            _, loss = ddp(x, y)
            loss.backward()
            ddp.finish_gradient_sync()
            opt.step()
            ddp.zero_grad()
        engines[f"ringtrain/{algo}"] = step
    model = copy.deepcopy(base)
    tddp = DistributedDataParallel(model, bucket_cap_mb=bucket_mb,
                                   device_ids=[device.index] if device.type == "cuda" else None)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def torch_step(x, y):
        _, loss = tddp(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)
    engines["torch DDP"] = torch_step
    return engines, comms


def main() -> None:
    a = _args()
    ctx = init_distributed()
    try:
        device = ctx.device
        base, x, y = model_and_batch(a, ctx.rank, device)
        engines, comms = _engines(base, [s for s in a.algorithms.split(",") if s], a.bucket_mb, device)
        tokens = a.steps * a.batch * a.seq_len * ctx.world_size
        rates: dict[str, list[float]] = {name: [] for name in engines}
        for _trial in range(a.trials):
            for name, step in engines.items():
                seconds, _ = timed_steps(step, x, y, warmup=a.warmup, steps=a.steps, device=device)
                rates[name].append(tokens / seconds)
        if ctx.rank == 0:
            ref = statistics.median(rates["torch DDP"])
            n_params = sum(p.numel() for p in base.parameters())
            print(f"# DDP throughput: {ctx.world_size} ranks, {ctx.backend}, {device}, {a.attention}, "
                  f"{n_params / 1e6:.2f}M params, batch {a.batch} x {a.seq_len} per rank, "
                  f"{a.trials} trials x {a.steps} steps, bucket {a.bucket_mb} MiB")
            print(f"{'engine':>18} {'tokens/s (median)':>18} {'min':>10} {'max':>10} {'vs torch DDP':>13}")
            rows = []
            for name, r in rates.items():
                med = statistics.median(r)
                rows.append({"engine": name, "tokens_per_s": med, "min": min(r), "max": max(r), "ratio": med / ref})
                print(f"{name:>18} {med:>18.0f} {min(r):>10.0f} {max(r):>10.0f} {med / ref:>12.2f}x")
            if a.out:
                Path(a.out).mkdir(parents=True, exist_ok=True)
                (Path(a.out) / "ddp_bench.json").write_text(json.dumps({"args": vars(a), "results": rows}, indent=1))
        for comm in comms:
            comm.close()
    finally:
        shutdown()


if __name__ == "__main__":
    main()
