"""Attention benchmark: forward + backward time and peak memory of one mixing layer, per kind and length.

    python -m trainer.bench.attention --out runs/bench/attention
    python -m trainer.bench.attention --attention softmax,linear --min-len 256 --seq-len 2048

For every kind in --attention and every sequence length --min-len, 2 --min-len, ... <= --seq-len,
one layer runs --trials trials of --warmup + --iters forward + backward passes
(trainer/bench/attention_case.py says exactly what a case does); `step_ms` is the median over
trials of the mean pass. Each (kind, length) case runs in a fresh subprocess, so a case that
runs out of memory or passes --case-timeout seconds (interpreter start included) is recorded as
`oom` / `timeout` instead of ending the run; once a kind fails that way its longer lengths are
`skipped`. A case that fails otherwise is recorded as `error` and the run goes on.

Peak memory (`peak_mem_mb`, MiB) is the growth over a baseline taken right before the measured
passes (parallel/bench/timing.py PeakMemory): on CUDA exact tensor bytes of the caching
allocator; on CPU the growth of the peak resident set, which counts allocator slack and
libraries paged in and can read low when an earlier peak lay above the resident size
(`mem_slack_mb` bounds that): compare kinds and lengths with it, do not read it as bytes.

Outputs (trainer/bench/output.py): table.txt (time and memory per kind and length, and the
summary of trainer/bench/attention_summary.py: growth for 8x the length, crossover with
softmax), attention.csv (for a case that did not run, step_ms and peak_mem_mb hold its status),
attention.json (args, meta, every case with its trials, summary) and attention.png (time and
memory against length, log-log). `flops_per_token_fwd` is the layer's own `flops_per_token(T)`:
forward matmul FLOPs per token of the mixing, without the q/k/v/out projections.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import signal
import subprocess
import sys
import time

import torch

from models.config import AttentionConfig
from parallel.process_group import abort_process

from . import flags, output
from .attention_case import DTYPES, KIND_SETTINGS, RESULT_MARKER, make_layer, run_child
from .attention_summary import summarize, summary_text

CSV_COLUMNS = ["kind", "seq_len", "batch", "d_model", "n_heads", "dtype", "device", "step_ms", "peak_mem_mb",
               "flops_per_token_fwd"]
FAILED = ("oom", "timeout")  # statuses after which longer lengths of the kind are skipped
SHAPE = ("attention", "d_model", "n_heads", "seq_len", "batch")
FORWARDED = (*SHAPE, "warmup", "iters", "trials", "seed", "dtype", "device", "threads", "prime_len")


def parse_args(argv=None) -> argparse.Namespace:
    ap = flags.parser("attention", __doc__, shape=SHAPE, many_kinds=True,
                      defaults={"attention": "softmax,linear,performer,gau,transnormer", "d_model": 256,
                                "seq_len": 8192, "batch": 1, "trials": 3, "iters": 1, "warmup": 1})
    ap.add_argument("--min-len", type=flags.number(), default=256, help="shortest sequence length; lengths "
                    "double up to --seq-len")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                    help="float32, or bfloat16 autocast with float32 weights")
    ap.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda or cuda:N")
    ap.add_argument("--case-timeout", type=flags.number(float, 0, above=True), default=120.0,
                    help="seconds per (kind, length) case, interpreter start included")
    ap.add_argument("--prime-len", type=flags.number(int, 0), default=64,
                    help="tokens of one untimed pass before the memory baseline; 0 = none")
    ap.add_argument("--threads", type=flags.number(int, 0), default=0, help="torch threads per case; 0 = default")
    ap.add_argument("--one", nargs=2, metavar=("KIND", "LEN"), help=argparse.SUPPRESS)  # internal: one case
    a = flags.parse(ap, argv)
    if a.seq_len < a.min_len:
        ap.error(f"--seq-len ({a.seq_len}) must be >= --min-len ({a.min_len})")
    if a.device == "auto":
        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("--device cuda asked for, but torch.cuda.is_available() is false")
    if a.one is not None and (a.one[0] not in a.attention or not a.one[1].isdigit()):
        ap.error(f"--one needs KIND LEN, got {a.one}")
    return a


def sequence_lengths(min_len: int, max_len: int) -> list[int]:
    """min_len, 2 min_len, 4 min_len, ... up to max_len inclusive."""
    out, length = [], min_len
    while length <= max_len:
        out.append(length)
        length *= 2
    return out


def run_case_subprocess(kind: str, seq_len: int, a) -> dict:
    """One case in a fresh interpreter; never raises for OOM, timeout or a failing case."""
    cwd, env = flags.child_env()
    cmd = [sys.executable, "-m", "trainer.bench.attention", "--one", kind, str(seq_len), *flags.argv_of(a, FORWARDED)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=a.case_timeout)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "message": f"over --case-timeout {a.case_timeout:g} s (killed)"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_MARKER):
            return {**json.loads(line[len(RESULT_MARKER):]), "case_wall_s": time.perf_counter() - t0}
    if proc.returncode == -signal.SIGKILL:
        return {"status": "oom", "message": "killed by SIGKILL without a result (most likely the OOM killer)"}
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"status": "error", "message": f"exit code {proc.returncode}: {tail}"[:500]}


def run_sweep(a, lengths: list[int]) -> list[dict]:
    records = []
    for kind in a.attention:
        failed: tuple[str, int] | None = None
        for seq_len in lengths:
            flops = make_layer(kind, d_model=a.d_model, n_heads=a.n_heads, seq_len=seq_len).flops_per_token(seq_len)
            if failed is not None:
                result = {"status": "skipped", "message": f"{failed[0]} at seq_len {failed[1]}"}
            else:
                result = run_case_subprocess(kind, seq_len, a)
                if result["status"] in FAILED:
                    failed = (result["status"], seq_len)
            rec = {"kind": kind, "seq_len": seq_len, "batch": a.batch, "d_model": a.d_model, "n_heads": a.n_heads,
                   "dtype": a.dtype, "device": a.device, "flops_per_token_fwd": float(flops), **result}
            records.append(rec)
            shown = f"{rec['step_ms']:.2f} ms, {rec['peak_mem_mb']:.1f} MiB" if rec["status"] == "ok" else \
                f"{rec['status']}: {rec.get('message', '')}"
            print(f"{kind:<12} {seq_len:>7}: {shown}", flush=True)
    return records


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.one is not None:
        return run_child(a)
    lengths = sequence_lengths(a.min_len, a.seq_len)
    records = run_sweep(a, lengths)
    summary = summarize(records, a.attention, lengths[-1])
    _report(a, lengths, records, summary)
    return 0


def _pivot(records: list[dict], a, lengths: list[int], key: str, digits: int, title: str) -> str:
    by = {(r["kind"], r["seq_len"]): r for r in records}
    cells = [[kind] + [f"{by[(kind, n)][key]:.{digits}f}" if by[(kind, n)]["status"] == "ok" else
                       by[(kind, n)]["status"] for n in lengths] for kind in a.attention]
    return output.text_table(["kind", *map(str, lengths)], cells, title)


def _plot(records: list[dict], a, lengths: list[int]):
    fig, axes = output.subplots(2, width=7.5, height=5)
    where = f"{a.device}, {a.dtype}, batch {a.batch}, d_model {a.d_model}, {a.n_heads} heads"
    for ax, key, label in zip(axes, ("step_ms", "peak_mem_mb"), ("forward + backward time (ms, median)",
                                                                  "peak memory growth (MiB)")):
        firsts = []
        for kind in a.attention:
            pts = [(r["seq_len"], r[key]) for r in records if r["kind"] == kind and r["status"] == "ok" and r[key] > 0]
            failed = next((r for r in records if r["kind"] == kind and r["status"] in FAILED), None)
            if pts:
                ax.plot(*zip(*pts), marker="o",
                        label=kind + (f" ({failed['status']} from {failed['seq_len']})" if failed else ""))
                firsts.append(pts[0])
        if firsts and len(lengths) > 1:  # O(T) and O(T^2) guides from the lowest first point
            x0, y0 = min(firsts, key=lambda p: p[1])
            xs = [n for n in lengths if n >= x0]
            ax.plot(xs, [y0 * n / x0 for n in xs], ls="--", color="grey", lw=0.8, label="O(T) guide")
            ax.plot(xs, [y0 * (n / x0) ** 2 for n in xs], ls=":", color="grey", lw=0.8, label="O(T^2) guide")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(lengths, [str(n) for n in lengths])
        ax.set_xlabel("sequence length T")
        ax.set_ylabel(label)
        ax.set_title(f"one attention layer: {label.split(' (')[0]}\n({where})", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    return fig


def _report(a, lengths: list[int], records: list[dict], summary: dict) -> None:
    cpu = a.device == "cpu"
    memory = "resident-set growth via ru_maxrss, not tensor bytes" if cpu else "max_memory_allocated growth"
    table = "\n\n".join([
        _pivot(records, a, lengths, "step_ms", 2, "forward + backward time, ms (median)"),
        _pivot(records, a, lengths, "peak_mem_mb", 1, f"peak memory, MiB ({memory})"),
        summary_text(summary, a.attention)])
    meta = output.run_meta(
        lengths=lengths, kind_settings={k: dataclasses.asdict(AttentionConfig(kind=k, **KIND_SETTINGS.get(k, {})))
                                        for k in a.attention},
        time="median over trials of the mean forward + backward pass, host timer, device synchronised",
        peak_mem_mb=("growth of ru_maxrss (peak resident set) over a baseline right before the measured passes "
                     "(after a --prime-len pass); resident-set growth, not exact tensor bytes") if cpu else
                    ("torch.cuda.max_memory_allocated after reset_peak_memory_stats, minus the bytes allocated "
                     "at the reset (layer, input, output gradient)"),
        flops_per_token_fwd="layer.flops_per_token(T): forward matmul FLOPs per token of the mixing, no q/k/v/out "
                            "projections")
    csv_rows = [r if r["status"] == "ok" else {**r, "step_ms": r["status"], "peak_mem_mb": r["status"]}
                for r in records]
    output.write(a.out, "attention", args=a, meta=meta, results=records, columns=CSV_COLUMNS, table=table,
                 figure=_plot(records, a, lengths), csv_rows=csv_rows, extra={"summary": summary})


if __name__ == "__main__":
    abort_process(None, exit_code=main() or 0)  # no interpreter teardown: see trainer/train.py
