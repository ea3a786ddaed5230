"""Benchmark output: the printed table, results.csv / results.json, the per-algorithm
summary against native, and busbw.png."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

# the contract of results.csv; the node layout (nodes, ranks_per_node) is in results.json's meta
CSV_COLUMNS = ["op", "algorithm", "world_size", "dtype", "size_bytes", "count", "time_us",
               "algbw_gbps", "busbw_gbps", "wrong"]


@dataclass
class Row:
    op: str
    algorithm: str
    world_size: int
    nodes: int
    ranks_per_node: int | None  # None: nodes hold different numbers of ranks
    dtype: str
    size_bytes: int
    count: int
    time_us: float
    algbw_gbps: float
    busbw_gbps: float
    wrong: int


def make_row(op, algorithm, world, layout, dtype_name, count, elem_size, seconds, factor, wrong) -> Row:
    size = count * elem_size
    algbw = size / seconds / 1e9 if seconds > 0 else 0.0
    return Row(op, algorithm, world, layout.nodes, layout.ranks_per_node, dtype_name, size, count, seconds * 1e6,
               algbw, algbw * factor, wrong)


def table_header(reduce_op: str) -> str:
    return (f"#{'op':>15} {'algorithm':>9} {'size(B)':>11} {'count':>10} {'type':>8} {'redop':>5} "
            f"{'time(us)':>10} {'algbw(GB/s)':>11} {'busbw(GB/s)':>11} {'#wrong':>6}")


def table_line(row: Row, reduce_op: str) -> str:
    redop = reduce_op if row.op in ("all_reduce", "reduce_scatter") else "none"
    return (f" {row.op:>15} {row.algorithm:>9} {row.size_bytes:>11} {row.count:>10} {row.dtype:>8} "
            f"{redop:>5} {row.time_us:>10.1f} {row.algbw_gbps:>11.3f} {row.busbw_gbps:>11.3f} {row.wrong:>6}")


def _geomean(xs: list[float]) -> float | None:
    xs = [x for x in xs if x > 0 and math.isfinite(x)]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else None


def summarize(rows: list[Row], large_min: int, small_max: int) -> list[dict]:
    """Per (op, algorithm): geometric-mean busbw ratio to native over large sizes and
    latency ratio to native over small sizes (below 1.0 = faster than native), and per
    op the best hand-written algorithm's worst small-size latency ratio."""
    native = {(r.op, r.size_bytes): r for r in rows if r.algorithm == "native"}
    out = []
    for op in dict.fromkeys(r.op for r in rows):
        for algo in dict.fromkeys(r.algorithm for r in rows if r.op == op):
            if algo == "native":
                continue
            mine = [r for r in rows if r.op == op and r.algorithm == algo and (op, r.size_bytes) in native]
            large = [r.busbw_gbps / native[(op, r.size_bytes)].busbw_gbps for r in mine
                     if r.size_bytes >= large_min and native[(op, r.size_bytes)].busbw_gbps > 0]
            small = [r.time_us / native[(op, r.size_bytes)].time_us for r in mine
                     if r.size_bytes <= small_max and native[(op, r.size_bytes)].time_us > 0]
            out.append({"op": op, "algorithm": algo, "large_busbw_ratio": _geomean(large),
                        "large_sizes": len(large), "small_latency_ratio": _geomean(small),
                        "small_sizes": len(small)})
        # best of the hand-written algorithms at each small size, then its worst case
        best = []
        for (o, size), nat in native.items():
            if o != op or size > small_max or nat.time_us <= 0:
                continue
            times = [r.time_us for r in rows if r.op == op and r.size_bytes == size and r.algorithm != "native"]
            if times:
                best.append(min(times) / nat.time_us)
        if best:
            out.append({"op": op, "algorithm": "best-of-hand-written", "large_busbw_ratio": None,
                        "large_sizes": 0, "small_latency_ratio": _geomean(best),
                        "small_worst_latency_ratio": max(best), "small_sizes": len(best)})
    return out


def summary_text(summary: list[dict], memcpy_gbps: float, world: int) -> str:
    fmt = lambda x: "   n/a" if x is None else f"{x:6.2f}x"  # noqa: E731
    lines = [f"# summary vs native, {world} ranks (busbw ratio: higher is better; latency ratio: lower is better)",
             f"#{'op':>15} {'algorithm':>21} {'busbw(large)':>13} {'latency(small)':>15}"]
    for s in summary:
        extra = ""
        if "small_worst_latency_ratio" in s:
            extra = f"  worst size {s['small_worst_latency_ratio']:.2f}x"
        lines.append(f" {s['op']:>15} {s['algorithm']:>21} {fmt(s['large_busbw_ratio']):>13} "
                     f"{fmt(s['small_latency_ratio']):>15}{extra}")
    lines.append(f"# memory-copy ceiling of this node: {memcpy_gbps:.2f} GB/s (one rank copying 64 MiB)")
    return "\n".join(lines)


def write_csv(path: Path, rows: list[Row]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_COLUMNS)
        for r in rows:
            d = asdict(r)
            d["time_us"] = f"{r.time_us:.3f}"
            d["algbw_gbps"] = f"{r.algbw_gbps:.6f}"
            d["busbw_gbps"] = f"{r.busbw_gbps:.6f}"
            w.writerow([d[c] for c in CSV_COLUMNS])


def write_json(path: Path, rows: list[Row], summary: list[dict], meta: dict) -> None:
    path.write_text(json.dumps({"meta": meta, "summary": summary, "results": [asdict(r) for r in rows]},
                               indent=1))


def plot_busbw(path: Path, rows: list[Row], memcpy_gbps: float, world: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ops = list(dict.fromkeys(r.op for r in rows))
    fig, axes = plt.subplots(1, len(ops), figsize=(5.5 * len(ops), 4.2), squeeze=False)
    for ax, op in zip(axes[0], ops):
        for algo in dict.fromkeys(r.algorithm for r in rows if r.op == op):
            pts = sorted((r.size_bytes, r.busbw_gbps) for r in rows if r.op == op and r.algorithm == algo)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=algo)
        ax.axhline(memcpy_gbps, color="grey", ls="--", lw=1, label="memcpy ceiling")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("message size (bytes)")
        ax.set_ylabel("busbw (GB/s)")
        ax.set_title(f"{op}, {world} ranks")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
