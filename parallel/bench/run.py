"""The sweep: op x size x algorithm, every rank in lock-step; rank 0 reports.

For one op and size all algorithms run back to back, so the ratios to native
compare measurements taken moments apart on the same machine state.
"""

from __future__ import annotations

import logging
import platform
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from ..collectives import Communicator, Tuning, available
from ..process_group import init_distributed, shutdown
from . import report
from .config import BenchPlan, make_plan
from .measure import BUSBW_FACTOR, build_case, count_wrong, element_count, memcpy_bandwidth, time_case

log = logging.getLogger("ringtrain.bench")


def _quiet_other_ranks(rank: int) -> None:
    """Only rank 0 writes the run directory's log file."""
    if rank == 0:
        return
    root = logging.getLogger()
    for h in list(root.handlers):
        if isinstance(h, logging.FileHandler):
            root.removeHandler(h)
            h.close()


def run_bench(cfg, out_dir: str | Path) -> list[report.Row]:
    """Runs the sweep described by `cfg` (a BenchConfig or DictConfig) and writes its files."""
    plan: BenchPlan = make_plan(cfg)  # every bad value fails here, before any process group
    ctx = init_distributed(plan.backend)
    _quiet_other_ranks(ctx.rank)
    try:
        return _sweep(plan, ctx, Path(out_dir), progress=bool(cfg.progress), plot=bool(cfg.plot))
    finally:
        shutdown()


def _sweep(plan: BenchPlan, ctx, out_dir: Path, progress: bool, plot: bool) -> list[report.Row]:
    world, main = ctx.world_size, ctx.is_main
    tuning = Tuning(segment_bytes=plan.segment_bytes, window=plan.window)
    comms = {a: Communicator(algorithm=a, tuning=tuning) for a in plan.algorithms}
    elem = torch.empty(0, dtype=plan.dtype).element_size()
    pairs = [(op, a) for op in plan.ops for a in plan.algorithms if a in available(op)]
    skipped = [(op, a) for op in plan.ops for a in plan.algorithms if a not in available(op)]
    memcpy = memcpy_bandwidth(ctx.device) if main else 0.0
    dist.barrier()
    if main:
        print(f"# ringtrain collective benchmark: {world} ranks, backend {ctx.backend}, device "
              f"{ctx.device.type}, dtype {plan.dtype_name}, iters {plan.iters}, warmup {plan.warmup}, "
              f"segment {plan.segment_bytes} B x window {plan.window}", flush=True)
        for op, a in skipped:
            print(f"# skipped: {a} has no {op} (algorithms for {op}: {', '.join(available(op))})")
    rows: list[report.Row] = []
    bar = tqdm(total=len(pairs) * len(plan.sizes), disable=not (main and progress),
               file=sys.stderr, desc="bench", leave=False)
    lines = []
    for op in plan.ops:
        algos = [a for a in plan.algorithms if a in available(op)]
        if not algos:
            continue
        if main:
            lines.append(report.table_header(plan.reduce_op))
        seen = set()
        for size in plan.sizes:
            count = element_count(op, size, elem, world)
            if count in seen:  # small sizes that round to the same element count
                bar.update(len(algos))
                continue
            seen.add(count)
            for algo in algos:
                case = build_case(comms[algo], op, count, plan.dtype, plan.reduce_op, ctx.device)
                wrong = count_wrong(case) if plan.check else 0
                wrong_t = torch.tensor([wrong], dtype=torch.int64, device=ctx.device)
                dist.all_reduce(wrong_t)
                seconds = time_case(case, plan.warmup, plan.iters, ctx.device, None)
                row = report.make_row(op, algo, world, plan.dtype_name, count, elem, seconds,
                                      BUSBW_FACTOR[op](world), int(wrong_t.item()))
                rows.append(row)
                if main:
                    lines.append(report.table_line(row, plan.reduce_op))
                    if progress:
                        bar.write(lines[-1])
                bar.update(1)
    bar.close()
    for c in comms.values():
        c.close()
    if main:
        summary = report.summarize(rows, plan.large_min_bytes, plan.small_max_bytes)
        text = report.summary_text(summary, memcpy, world)
        if not progress:
            print("\n".join(lines))
        print(text, flush=True)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "table.txt").write_text("\n".join(lines) + "\n" + text + "\n")
        report.write_csv(out_dir / "results.csv", rows)
        meta = {"world_size": world, "backend": ctx.backend, "device": str(ctx.device),
                "dtype": plan.dtype_name, "reduce_op": plan.reduce_op, "iters": plan.iters,
                "warmup": plan.warmup, "segment_bytes": plan.segment_bytes, "window": plan.window,
                "memcpy_gbps": memcpy, "torch": torch.__version__, "python": platform.python_version(),
                "host": platform.node(), "skipped": [f"{a}/{op}" for op, a in skipped]}
        report.write_json(out_dir / "results.json", rows, summary, meta)
        if plot:
            report.plot_busbw(out_dir / "busbw.png", rows, memcpy, world)
        log.info("wrote %s", out_dir)
    return rows
