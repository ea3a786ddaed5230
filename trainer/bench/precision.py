"""Training throughput of fp32 / bf16 / fp16 under ringtrain's own DDP and ZeRO.

    torchrun --standalone --nproc_per_node=2 -m trainer.bench.precision --parallel ddp,zero2

One row per (parallelism, precision): the native engine's step (`build_engine("native")`) with
that precision: half parameters and float32 masters inside the wrapper, autocast, dynamic loss
scaling for fp16 (the defaults of docs/design.md). Every row starts from the same float32 weights and steps
on the same batches; trials are interleaved, and `ratio` is the throughput over fp32's under the
same parallelism. The losses of the first and last steps (mean over ranks) show that every
precision trains alike, and `skipped_steps` counts fp16 overflows. `matmul_gflops` is one
rank's bare n x n matmul in the precision's dtype (the ceiling that explains the ratios); on a
GPU each row also gets its MFU (model FLOPs per token from the model, the peak from
trainer/mfu.py's table).
"""

from __future__ import annotations

import copy

import torch

from parallel.bench.timing import time_calls
from parallel.precision import PrecisionPolicy
from parallel.process_group import abort_process

from ..mfu import peak_flops
from . import common, flags, output

PRECISIONS = ("fp32", "bf16", "fp16")
PARALLEL = ("ddp", "zero1", "zero2", "zero3")
COLUMNS = ["parallel", "precision", "world_size", "tokens_per_s", "step_ms", "step_ms_min", "step_ms_max",
           "trials", "ratio", "steps", "skipped_steps", "first_loss", "last_loss", "matmul_gflops", "mfu"]


def parse_args(argv=None):
    ap = flags.parser("precision", __doc__, shape=tuple(flags.SHAPE),
                      defaults={"batch": 4, "trials": 7, "iters": 4, "warmup": 1})
    ap.add_argument("--precisions", type=flags.names(PRECISIONS), default=",".join(PRECISIONS),
                    help="precisions to compare (fp32, the reference, is always measured)")
    ap.add_argument("--parallel", type=flags.names(PARALLEL), default="ddp", help="parallelisms, one group each")
    ap.add_argument("--algorithm", choices=("ring", "rhd", "tree", "native"), default="ring",
                    help="collective algorithm")
    ap.add_argument("--grad-reduce", choices=("fp32", "half"), default="fp32", help="gradient communication dtype")
    ap.add_argument("--bucket-mb", type=flags.number(float, 0, above=True), default=25.0)
    ap.add_argument("--lr", type=flags.number(float, 0), default=1e-4,
                    help="AdamW learning rate, the same for every precision")
    a = flags.parse(ap, argv)
    if "fp32" not in a.precisions:
        a.precisions.insert(0, "fp32")  # the reference every ratio is taken against
    return a


def matmul_flops(precision: str, device: torch.device, n: int) -> float:
    """FLOP/s of one n x n matmul in the precision's dtype (timing.py: mean over ranks)."""
    dtype = PrecisionPolicy.from_name(precision).param_dtype
    x, y = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / time_calls(lambda: x @ y, warmup=2, iters=8, device=device)


def main(argv=None) -> int:
    a = parse_args(argv)
    with common.distributed() as ctx:
        device, mesh = ctx.device, common.topology(ctx)
        base = common.build_model(a, device)
        batch = common.FixedBatch(a, ctx.rank, device)
        keys = [(par, prec) for par in a.parallel for prec in a.precisions]
        contenders = {f"{par}/{prec}": common.engine_contender(
            "native", copy.deepcopy(base), mesh.communicators(algorithm=a.algorithm), a, device, batch, parallel=par,
            precision=prec, algorithm=a.algorithm, grad_reduce=a.grad_reduce, bucket_mb=a.bucket_mb)
            for par, prec in keys}
        times = common.time_steps(contenders, a, device)
        loss = common.losses(contenders, mesh.group("dp"), device)
        matmul = {p: matmul_flops(p, device, 2048 if device.type == "cuda" else 256) for p in a.precisions}
        tokens = a.batch * a.seq_len * ctx.world_size
        flops_per_token = base.flops_per_token(a.seq_len)
        rows = []
        for par, prec in keys:
            name, c = f"{par}/{prec}", contenders[f"{par}/{prec}"]
            row = {"parallel": par, "precision": prec, "world_size": ctx.world_size,
                   **output.timed(times[name], tokens),
                   "steps": c.steps, "skipped_steps": c.engine.metrics()["skipped_steps"],
                   "first_loss": loss[name][0], "last_loss": loss[name][1], "matmul_gflops": matmul[prec] / 1e9,
                   "mfu": None}
            if device.type == "cuda":  # model FLOP/s per device over that device's peak for this precision
                peak, source = peak_flops(device, bf16=prec != "fp32")
                row.update(mfu=flops_per_token * row["tokens_per_s"] / (peak * ctx.world_size), peak_source=source)
            rows.append(row)
        output.ratios(rows, lambda r: r["precision"] == "fp32", group=lambda r: r["parallel"])
        if ctx.is_main:
            _report(a, rows, output.run_meta(ctx, params=base.num_params(), flops_per_token=flops_per_token))
        common.close_all(contenders.values())
    return 0


def _report(a, rows: list[dict], meta: dict) -> None:
    title = (f"# precision throughput: {output.run_line(a, meta)}, {a.algorithm} all-reduce, gradients in "
             f"{a.grad_reduce}; ratio = throughput / fp32's")
    mfu = any(r["mfu"] is not None for r in rows)
    table = output.text_table(
        ["parallel", "precision", "tokens/s", "[min, max] ms/step", "ratio", "skipped", "loss first -> last",
         "matmul GFLOP/s"] + (["MFU"] if mfu else []),
        [[r["parallel"], r["precision"], f"{r['tokens_per_s']:.0f}",
          f"[{r['step_ms_min']:.1f}, {r['step_ms_max']:.1f}]",
          output.cell(r["ratio"], ".2f", "x"), str(r["skipped_steps"]),
          f"{r['first_loss']:.3f} -> {r['last_loss']:.3f}", f"{r['matmul_gflops']:.1f}"]
         + ([output.cell(r["mfu"], ".1%")] if mfu else []) for r in rows], title)
    fig, (ax,) = output.subplots()
    output.bars(ax, list(a.parallel), {p: [next(r["tokens_per_s"] for r in rows if (r["parallel"], r["precision"])
                                             == (par, p)) for par in a.parallel] for p in a.precisions},
                "tokens/s (median)", f"precision under ringtrain's DDP / ZeRO, {meta['world_size']} ranks")
    output.write(a.out, "precision", args=a, meta=meta, results=rows, columns=COLUMNS, table=table, figure=fig)


if __name__ == "__main__":
    abort_process(None, exit_code=main() or 0)  # no interpreter teardown: see trainer/train.py
