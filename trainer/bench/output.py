"""The one output convention of the benchmarks, and the way every timed row reports its trials.

`write` puts, into the benchmark's `--out` folder: the table (printed, and `table.txt`),
`<name>.csv` (the given columns, one row per result), `<name>.json` (`args`, `meta`,
`results`, and any extra sections such as a summary) and `<name>.png`.

`timed` turns the timer's seconds per step of every trial (parallel/bench/timing.py: mean
over ranks, trials interleaved) into one row's figures: `trial_s` as measured, `trials`,
`step_ms` (the median) with its span `step_ms_min` / `step_ms_max`, and `tokens_per_s` at
the median. `ratios` sets `ratio`, the row's throughput over a peer's measured in the same
run (the peer's median step time over the row's; > 1: faster than the peer).
"""

from __future__ import annotations

import csv
import json
import platform
import statistics
import sys
from pathlib import Path
from typing import Callable

import torch


def timed(trial_s: list[float], tokens_per_step: float | None = None) -> dict:
    """A row's timing figures from the per-trial seconds per step (see the module docstring)."""
    med = statistics.median(trial_s)
    return {"trial_s": list(trial_s), "trials": len(trial_s), "step_ms": med * 1e3,
            "step_ms_min": min(trial_s) * 1e3, "step_ms_max": max(trial_s) * 1e3,
            "tokens_per_s": tokens_per_step / med if tokens_per_step else None}


def ratios(rows: list[dict], is_peer: Callable[[dict], bool], group: Callable[[dict], object] = lambda r: None) -> None:
    """Sets each row's `ratio` against the peer row of its group (None without one)."""
    peers = {group(r): r for r in rows if is_peer(r) and "step_ms" in r}
    for r in rows:
        peer = peers.get(group(r))
        r["ratio"] = peer["step_ms"] / r["step_ms"] if peer is not None and "step_ms" in r else None


def cell(value, spec: str, suffix: str = "") -> str:
    """`value` formatted, or '-' where there is none."""
    return "-" if value is None else format(value, spec) + suffix


def text_table(header: list[str], rows: list[list[str]], title: str = "") -> str:
    """Aligned columns (the first left, the others right) under an optional title line."""
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]

    def line(cells):
        return " ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join(([title] if title else []) + [line(header)] + [line(r) for r in rows])


def subplots(ncols: int = 1, *, width: float = 6.5, height: float = 4.2):
    """A matplotlib figure (Agg, no display needed) and its list of `ncols` axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, height), squeeze=False)
    return fig, list(axes[0])


def bars(ax, groups: list[str], series: dict[str, list[float | None]], ylabel: str, title: str) -> None:
    """Grouped bars: one group per label, one bar per series (a missing value draws nothing)."""
    width = 0.8 / max(1, len(series))
    for j, (name, values) in enumerate(series.items()):
        xs = [i + j * width for i, v in enumerate(values) if v is not None]
        ax.bar(xs, [v for v in values if v is not None], width=width, label=name)
    ax.set_xticks([i + width * (len(series) - 1) / 2 for i in range(len(groups))], groups, rotation=30, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)


def run_line(a, meta: dict) -> str:
    """A training benchmark's run in one phrase, for its table's title: the job, the model, the trials."""
    return (f"{meta['world_size']} ranks, {meta['backend']}, {meta['device']}, {a.attention}, "
            f"{meta['params'] / 1e6:.2f}M params (d_model {a.d_model} x {a.n_layers} layers), batch {a.batch} x "
            f"{a.seq_len} per rank, median of {a.trials} interleaved trials x {a.iters} steps")


def run_meta(ctx=None, **extra) -> dict:
    """Where and how a benchmark ran: the command, versions, host, threads, and the job (`ctx`)."""
    meta = {"command": " ".join([Path(sys.orig_argv[0]).name, *sys.orig_argv[1:]]), "torch": torch.__version__,
            "python": platform.python_version(), "host": platform.node(), "threads": torch.get_num_threads()}
    if ctx is not None:
        device = torch.cuda.get_device_name(ctx.device) if ctx.device.type == "cuda" else "cpu"
        meta.update(world_size=ctx.world_size, backend=ctx.backend, device=device)
    return {**meta, **extra}


def write(out: str | Path, name: str, *, args, meta: dict, results: list[dict], columns: list[str], table: str,
          figure, csv_rows: list[dict] | None = None, extra: dict | None = None) -> Path:
    """Prints `table` and writes table.txt, <name>.csv, <name>.json and <name>.png (from
    `figure`, which is closed) into `out`; `csv_rows` stands for `results` in the CSV."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    print(table, flush=True)
    (out / "table.txt").write_text(table + "\n")
    with open(out / f"{name}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, columns, extrasaction="ignore")
        w.writeheader()
        w.writerows(results if csv_rows is None else csv_rows)
    args = vars(args) if not isinstance(args, dict) else args
    (out / f"{name}.json").write_text(json.dumps({"args": args, "meta": meta, "results": results, **(extra or {})},
                                                 indent=1))
    figure.tight_layout()
    figure.savefig(out / f"{name}.png", dpi=110)
    import matplotlib.pyplot as plt

    plt.close(figure)
    print(f"wrote {out}/: table.txt, {name}.csv, {name}.json, {name}.png", flush=True)
    return out
