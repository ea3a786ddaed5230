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

from ..collectives import AUTO, Communicator, Tuning, TuningTable, available, calibrate
from ..mesh import MeshShape, Topology
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


def _communicators(plan: BenchPlan, ctx, mesh: Topology, notes: list[str]) -> dict[str, Communicator]:
    """One communicator per algorithm over every rank, from the mesh (collective: hier and auto
    get their node levels there)."""
    tuning = Tuning(segment_bytes=plan.segment_bytes, window=plan.window)
    layout = mesh.layout
    comms = {}
    for a in plan.algorithms:
        if a == "hier" and not layout.uniform:
            notes.append(f"# skipped: hier needs the same number of ranks on every node ({layout.describe()})")
            continue
        if a == "hier" and plan.mode == "tune" and not layout.hierarchical:
            continue  # one node (or one rank per node): hier is the ring
        comms[a] = mesh.communicators(algorithm=a, tuning=tuning).dp
    auto = comms.get(AUTO)
    if auto is not None:
        table = plan.tuning
        why = table.mismatch(world_size=ctx.world_size, layout=auto.layout, backend=ctx.backend) if table else None
        if table is not None and why is None:
            auto.table = table
            notes.append(f"# auto: from {table.source}")
        else:
            if why:
                notes.append(f"# auto: the tuning file is not used: {why}")
            auto.table = calibrate(auto, list(plan.ops), max_bytes=max(plan.sizes), budget_s=plan.calibration_s,
                                   dtype=plan.dtype, device=ctx.device)
            notes.append(f"# auto: {auto.table.source}")
    return comms


def _sweep(plan: BenchPlan, ctx, out_dir: Path, progress: bool, plot: bool) -> list[report.Row]:
    world, main = ctx.world_size, ctx.is_main
    mesh = Topology.build(MeshShape(world), ctx.device.type)  # finds the nodes
    layout = mesh.layout
    notes: list[str] = []
    comms = _communicators(plan, ctx, mesh, notes)
    elem = torch.empty(0, dtype=plan.dtype).element_size()
    pairs = [(op, a) for op in plan.ops for a in comms if a in available(op) or a == AUTO]
    skipped = [(op, a) for op in plan.ops for a in comms if a not in available(op) and a != AUTO]
    memcpy = memcpy_bandwidth(ctx.device) if main else 0.0
    dist.barrier()
    if main:
        print(f"# ringtrain collective benchmark: {world} ranks ({layout.describe()}), backend {ctx.backend}, "
              f"device {ctx.device.type}, dtype {plan.dtype_name}, iters {plan.iters}, warmup {plan.warmup}, "
              f"segment {plan.segment_bytes} B x window {plan.window}", flush=True)
        for op, a in skipped:
            print(f"# skipped: {a} has no {op} (algorithms for {op}: {', '.join(available(op))})")
        for note in notes:
            print(note)
    rows: list[report.Row] = []
    bar = tqdm(total=len(pairs) * len(plan.sizes), disable=not (main and progress),
               file=sys.stderr, desc="bench", leave=False)
    lines = []
    for op in plan.ops:
        algos = [a for a in comms if a in available(op) or a == AUTO]
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
                row = report.make_row(op, algo, world, layout, plan.dtype_name, count, elem, seconds,
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
        meta = {"world_size": world, "nodes": layout.nodes, "ranks_per_node": layout.ranks_per_node,
                "backend": ctx.backend, "device": str(ctx.device),
                "dtype": plan.dtype_name, "reduce_op": plan.reduce_op, "iters": plan.iters,
                "warmup": plan.warmup, "segment_bytes": plan.segment_bytes, "window": plan.window,
                "memcpy_gbps": memcpy, "torch": torch.__version__, "python": platform.python_version(),
                "host": platform.node(), "skipped": [f"{a}/{op}" for op, a in skipped]}
        report.write_json(out_dir / "results.json", rows, summary, meta)
        if plot:
            report.plot_busbw(out_dir / "busbw.png", rows, memcpy, world)
        if plan.mode == "tune":
            table = tuning_table(rows, layout, ctx.backend, source=str(out_dir / "results.csv"))
            table.save(out_dir / "tuning.json")
            print(f"# wrote {out_dir / 'tuning.json'}: {len(table.entries)} sizes x ops for {world} ranks as "
                  f"{layout.describe()}; train with parallel.algorithm=auto parallel.tuning={out_dir / 'tuning.json'}")
        log.info("wrote %s", out_dir)
    return rows


def tuning_table(rows: list[report.Row], layout, backend: str, source: str) -> TuningTable:
    """The measured seconds per call of every algorithm, per op, dtype and size (auto's rows left out)."""
    from ..collectives.autotune import Entry

    by_case: dict[tuple, dict[str, float]] = {}
    for r in rows:
        if r.algorithm != AUTO and r.wrong == 0 and r.time_us > 0:
            by_case.setdefault((r.op, r.dtype, r.size_bytes), {})[r.algorithm] = r.time_us / 1e6
    entries = [Entry(op, dtype, size, secs) for (op, dtype, size), secs in by_case.items()]
    return TuningTable(world_size=layout.world_size, nodes=layout.nodes, ranks_per_node=layout.ranks_per_node,
                       backend=backend, entries=entries, source=source)
