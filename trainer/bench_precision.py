"""Training throughput of fp32 / bf16 / fp16 under ringtrain's own data parallelism.

    torchrun --standalone --nproc_per_node=2 -m trainer.bench_precision --parallel ddp,zero2

Same model (same float32 initial weights), same synthetic batches, same ranks, in one
run; every precision is the trainer's own step (parallel.precision policy, half
parameters with float32 masters inside the wrapper, dynamic loss scaling for fp16).
Precisions are interleaved trial by trial (fp32 bf16 fp16 fp32 bf16 fp16 ...), so slow
phases of a shared machine hit all of them alike; the figure is the median tokens/s over
trials and its ratio to fp32 under the same parallelism. On a GPU also MFU (trainer/mfu.py).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
from pathlib import Path

import torch

from models.transformer import DecoderLM
from parallel.collectives import Communicator
from parallel.data_parallel import apply_ddp
from parallel.loss_scale import DynamicLossScaler
from parallel.precision import PrecisionPolicy, unscale_clip_step
from parallel.process_group import init_distributed, shutdown
from parallel.zero import apply_zero

from .bench_common import model_and_batch, timed_steps
from .mfu import measure_matmul_flops, peak_flops

PRECISIONS = ("fp32", "bf16", "fp16")
PARALLEL = ("ddp", "zero1", "zero2", "zero3")


def _args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--precisions", default=",".join(PRECISIONS))
    ap.add_argument("--parallel", default="ddp", help=f"comma-separated, of {','.join(PARALLEL)}")
    ap.add_argument("--algorithm", default="ring", help="collective algorithm (ring | rhd | tree | native)")
    ap.add_argument("--grad-reduce", default="fp32", choices=["fp32", "half"], help="gradient communication dtype")
    ap.add_argument("--attention", default="softmax")
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--n-layers", type=int, default=4)
    ap.add_argument("--n-heads", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4, help="sequences per rank per step")
    ap.add_argument("--steps", type=int, default=4, help="timed steps per trial")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps before each trial")
    ap.add_argument("--trials", type=int, default=7)
    ap.add_argument("--bucket-mb", type=float, default=25.0)
    ap.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (the same for every precision)")
    ap.add_argument("--out", default=None, help="folder for precision_bench.json (rank 0)")
    a = ap.parse_args()
    for k in ("steps", "trials", "batch", "seq_len"):
        if getattr(a, k) < 1:
            ap.error(f"--{k.replace('_', '-')} must be >= 1")
    if not a.lr >= 0:
        ap.error(f"--lr must be >= 0, got {a.lr}")
    a.precisions, a.parallel = [s for s in a.precisions.split(",") if s], [s for s in a.parallel.split(",") if s]
    for key, names, allowed in (("precisions", a.precisions, PRECISIONS), ("parallel", a.parallel, PARALLEL)):
        bad = [n for n in names if n not in allowed]
        if bad or not names:
            ap.error(f"--{key} takes names from {','.join(allowed)}, got {bad or 'nothing'}")
    if "fp32" not in a.precisions:
        a.precisions.insert(0, "fp32")  # the reference every ratio is taken against
    return a


class Engine:
    """One (parallelism, precision): its own model copy, wrapper, optimizer and scaler,
    stepping exactly as trainer/loop.py's train_step does (one micro-batch)."""

    def __init__(self, base: DecoderLM, parallel: str, precision: str, a, device: torch.device):
        model = copy.deepcopy(base)  # the wrappers cast parameters to half in place
        self.policy = PrecisionPolicy.from_name(precision, grad_reduce=a.grad_reduce)
        self.comm = Communicator(None, algorithm=a.algorithm)
        groups = model.param_groups(0.1)
        mp = {"param_dtype": self.policy.param_dtype, "reduce_dtype": self.policy.reduce_dtype}
        if parallel == "ddp":
            self.wrapper = apply_ddp(model, bucket_mb=a.bucket_mb, comm=self.comm, **mp)
        else:
            self.wrapper = apply_zero(model, stage=int(parallel[-1]), param_groups=groups, bucket_mb=a.bucket_mb,
                                      blocks=list(model.blocks), comm=self.comm, **mp)
        self.wrapper.build_optimizer(lambda g: torch.optim.AdamW(g, lr=a.lr, betas=(0.9, 0.95)), groups)
        self.scaler = DynamicLossScaler() if self.policy.needs_loss_scaling else None  # DESIGN.md defaults
        self.device = device
        self.first_loss = self.loss = float("nan")  # the loss of its first step (initial weights) and last

    def step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        scale = self.scaler.scale if self.scaler else 1.0
        with self.policy.autocast(self.device):
            _, loss = self.wrapper(x, y)
        self.wrapper.backward(loss * scale)
        self.wrapper.finish_gradient_sync()
        unscale_clip_step(self.wrapper, self.scaler, max_norm=1.0)
        self.wrapper.zero_grad()
        if self.first_loss != self.first_loss:  # NaN: this was the first step
            self.first_loss = loss.item()
        return loss

    @property
    def skipped(self) -> int:
        return self.scaler.state.skipped_steps if self.scaler else 0


def _timed_trial(eng: Engine, x, y, a, device) -> tuple[float, int]:
    """(seconds of the slowest rank for a.steps steps, overflowed steps among them)"""
    skipped0 = eng.skipped
    seconds, loss = timed_steps(eng.step, x, y, warmup=a.warmup, steps=a.steps, device=device)
    eng.loss = loss.item()
    return seconds, eng.skipped - skipped0


def main() -> None:
    a = _args()
    ctx = init_distributed()
    try:
        device = ctx.device
        base, x, y = model_and_batch(a, ctx.rank, device)  # each rank its own batch, the same for every engine
        engines = {(par, prec): Engine(base, par, prec, a, device) for par in a.parallel for prec in a.precisions}
        tokens = a.steps * a.batch * a.seq_len * ctx.world_size
        rates = {k: [] for k in engines}
        skipped = dict.fromkeys(engines, 0)
        for _trial in range(a.trials):
            for key, eng in engines.items():
                seconds, n_skipped = _timed_trial(eng, x, y, a, device)
                rates[key].append(tokens / seconds)
                skipped[key] += n_skipped
        # what one rank's plain matmul does per dtype: the ceiling that explains the ratios
        matmul = {p: measure_matmul_flops(device, PrecisionPolicy.from_name(p).param_dtype, n=2048 if
                                          device.type == "cuda" else 256) for p in a.precisions}
        flops_per_token = base.flops_per_token(a.seq_len)
        peaks = {p: peak_flops(device, bf16=PrecisionPolicy.from_name(p).mixed) for p in a.precisions} \
            if device.type == "cuda" else {}
        if ctx.rank == 0:
            _report(a, ctx, base, engines, rates, skipped, matmul, flops_per_token, peaks)
        for eng in engines.values():
            eng.comm.close()
    finally:
        shutdown()


def _report(a, ctx, base, engines, rates, skipped, matmul, flops_per_token, peaks) -> None:
    device = ctx.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"# precision throughput: {ctx.world_size} ranks, {ctx.backend}, {name}, {a.attention}, "
          f"{base.num_params() / 1e6:.2f}M params, d_model {a.d_model} x {a.n_layers} layers, "
          f"batch {a.batch} x {a.seq_len} per rank, {a.trials} trials x {a.steps} steps, "
          f"{a.algorithm} all-reduce, gradients in {a.grad_reduce}")
    head = f"{'parallel':>8} {'precision':>9} {'tokens/s (median)':>18} {'min':>9} {'max':>9} {'vs fp32':>8} " \
           f"{'skipped':>7} {'loss':>7} {'matmul GFLOP/s':>14}"
    print(head + (f" {'MFU':>6}" if peaks else ""))
    rows = []
    for (par, prec), r in rates.items():
        med = statistics.median(r)
        row = {"parallel": par, "precision": prec, "tokens_per_s": med, "min": min(r), "max": max(r),
               "ratio_vs_fp32": med / statistics.median(rates[(par, "fp32")]), "trials": r,
               "skipped_steps": skipped[(par, prec)], "steps": a.trials * (a.warmup + a.steps),
               "first_loss": engines[(par, prec)].first_loss, "last_loss": engines[(par, prec)].loss,
               "matmul_gflops": matmul[prec] / 1e9}
        line = (f"{par:>8} {prec:>9} {med:>18.0f} {min(r):>9.0f} {max(r):>9.0f} {row['ratio_vs_fp32']:>7.2f}x "
                f"{row['skipped_steps']:>7} {row['last_loss']:>7.3f} {row['matmul_gflops']:>14.1f}")
        if peaks:  # model FLOP/s per device over that device's peak for this precision
            peak, src = peaks[prec]
            row.update(mfu=flops_per_token * med / (peak * ctx.world_size), peak_flops=peak, peak_source=src)
            line += f" {row['mfu']:>6.1%}"
        rows.append(row)
        print(line)
    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        meta = {"world_size": ctx.world_size, "backend": ctx.backend, "device": name,
                "params": base.num_params(), "flops_per_token": flops_per_token}
        (Path(a.out) / "precision_bench.json").write_text(
            json.dumps({"args": vars(a), "meta": meta, "results": rows}, indent=1))


if __name__ == "__main__":
    main()
