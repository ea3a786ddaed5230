"""Attention benchmark: forward + backward time and peak memory of one mixing layer, per kind and length.

    python -m models.bench_attention --out /tmp/attn
    python -m models.bench_attention --kinds softmax,linear --min-len 256 --max-len 2048 --out /tmp/attn

For every attention kind (softmax, linear, performer, gau, transnormer) and every
sequence length min_len, 2 min_len, ... <= max_len, one layer from `build_attention`
(the settings of configs/attention/<kind>.yaml, layer 0, weights from --seed) takes a
random (batch, T, d_model) input and a fixed random output gradient. `--warmup` untimed
and `--repeats` timed forward + backward passes run; the reported time is the median
(host timer, the device synchronised around each pass on CUDA). Parameter and input
gradients are cleared before every pass, so each pass allocates them afresh.
`--dtype bfloat16` runs the layer under bf16 autocast with float32 weights, as the
trainer's `precision=bf16` does.

Each (kind, length) case runs in a fresh subprocess (`--one KIND LEN`, an internal
mode that prints one JSON line), so a case that runs out of memory or passes
`--case-timeout` seconds (interpreter start included) is recorded as `oom` / `timeout`
instead of ending the run; once a kind fails that way, its longer lengths are
`skipped`. A case that fails otherwise is recorded as `error` and the run goes on.

Peak memory (`peak_mem_mb`, MiB = 2^20 bytes) is the growth over a baseline taken right
before the first measured forward, after the layer, the input and the output gradient
exist and after one untimed pass over the first `--prime-len` (64) tokens has paged in
the kernels and one-off state (on CPU some 40 MiB that would otherwise be charged to
every case alike):
- CUDA: torch.cuda.max_memory_allocated() after reset_peak_memory_stats(), minus the
  bytes allocated at that reset (exact tensor bytes of the caching allocator).
- CPU: there is no allocator counter, so it is the growth of the process's peak
  resident set size (resource.getrusage ru_maxrss) over its value at the baseline.
  That is resident-set growth, not tensor bytes: it includes allocator slack, lazily
  initialised kernel state and libraries paged in by the first pass, and it can read
  low when freed memory is reused or when an earlier peak (import, layer set-up) had
  pushed ru_maxrss above the resident size at the baseline (`rss_slack_mb` in the JSON
  bounds that). Compare kinds and lengths with it; do not read it as bytes.

Outputs in --out: attention.csv (columns CSV_COLUMNS; for a case that did not run,
time_ms and peak_mem_mb hold its status: oom, timeout, skipped or error),
attention.json (meta, every case with its individual times, summary),
attention_time.png and attention_memory.png (log-log, one line per kind); a table and
a summary are printed. The summary gives, per kind, the time growth for 8x the length
(e.g. 1024 -> 8192 and 256 -> 2048; a linear-time kind should stay <= 10x, softmax
approaches 64x) and, per non-softmax kind, the crossover: the first measured length
from which it is faster than softmax at every longer measured length.

`flops_per_token_fwd` is the layer's own `flops_per_token(T)`: forward matmul FLOPs
per token of the mixing, without the q/k/v/out projections (DESIGN.md, MFU).

Imports only torch and the standard library (matplotlib lazily, for the plots).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import json
import math
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import time

import torch

from .attention import ATTENTION_KINDS, build_attention
from .config import AttentionConfig

CSV_COLUMNS = ["kind", "seq_len", "batch", "d_model", "n_heads", "dtype", "device", "time_ms", "peak_mem_mb",
               "flops_per_token_fwd"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# Per-kind settings that differ from AttentionConfig's defaults, as in configs/attention/<kind>.yaml.
KIND_SETTINGS: dict[str, dict] = {"gau": {"chunk_size": 256}}
BASELINE_KIND = "softmax"
LINEAR_TIME_MAX_GROWTH = 10.0  # a linear-time kind: 8x the length -> at most 10x the time
GROWTH_FACTOR = 8
NAMED_GROWTH_PAIRS = ((1024, 8192), (256, 2048))
RESULT_MARKER = "BENCH_ATTENTION_RESULT "
FAILED = ("oom", "timeout")  # statuses after which longer lengths of the kind are skipped
MIB = 2 ** 20


# ----------------------------------------------------------------------------- set-up

def sequence_lengths(min_len: int, max_len: int) -> list[int]:
    """min_len, 2 min_len, 4 min_len, ... up to max_len inclusive."""
    out, length = [], min_len
    while length <= max_len:
        out.append(length)
        length *= 2
    return out


def make_layer(kind: str, *, d_model: int, n_heads: int, seq_len: int) -> torch.nn.Module:
    """The mixing layer of one decoder block for `kind`, with its config-group settings."""
    return build_attention(AttentionConfig(kind=kind, **KIND_SETTINGS.get(kind, {})), d_model=d_model,
                           n_heads=n_heads, seq_len=seq_len, layer_idx=0)


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _maxrss_mb() -> float:
    """Peak resident set size of this process so far, MiB (ru_maxrss is KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / MIB if sys.platform == "darwin" else rss / 1024


def _current_rss_mb() -> float | None:
    """Resident set size now, MiB (Linux /proc only; None elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MIB
    except (OSError, ValueError, IndexError):
        return None


def _sdpa_backend(q: torch.Tensor) -> str | None:
    """Which fused SDPA kernel causal attention on tensors like q would use (private torch API; None if absent)."""
    try:
        from torch.nn.attention import SDPBackend
        return SDPBackend(torch._fused_sdp_choice(q, q, q, is_causal=True)).name
    except Exception:  # noqa: BLE001 - informational only
        return None


# ----------------------------------------------------------------------------- one case (in the child)

def measure_case(kind: str, seq_len: int, *, batch: int, d_model: int, n_heads: int, dtype: str, device: str,
                 repeats: int, warmup: int, seed: int, prime_len: int = 0) -> dict:
    """Time `repeats` forward + backward passes of one layer and measure their peak memory, in this process."""
    dev = torch.device(device)
    torch.manual_seed(seed)
    layer = make_layer(kind, d_model=d_model, n_heads=n_heads, seq_len=seq_len).to(dev)
    x = torch.randn(batch, seq_len, d_model, device=dev, requires_grad=True)
    grad_out = torch.randn(batch, seq_len, d_model, device=dev, dtype=DTYPES[dtype])
    bf16 = dtype == "bfloat16"
    params = list(layer.parameters())

    def autocast():
        return torch.autocast(device_type=dev.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    def step(inp: torch.Tensor = x, grad: torch.Tensor = grad_out) -> None:
        for p in params:
            p.grad = None
        inp.grad = None
        with autocast():
            out = layer(inp)
        out.backward(grad if out.dtype == grad.dtype else grad.to(out.dtype))

    if prime_len > 0:  # page in kernels and lazily built state before the baseline; neither timed nor measured
        n = min(prime_len, seq_len)
        step(x[:, :n].detach().clone().requires_grad_(True), grad_out[:, :n].clone())
        for p in params:
            p.grad = None

    extra: dict = {}
    if kind == "softmax":
        probe = torch.empty(batch, n_heads, seq_len, d_model // n_heads, device=dev,
                            dtype=torch.bfloat16 if bf16 else torch.float32)
        extra["sdpa_backend"] = _sdpa_backend(probe)
        del probe
    _sync(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        base_alloc = torch.cuda.memory_allocated(dev)
    else:
        base_rss, current = _maxrss_mb(), _current_rss_mb()
        extra["rss_baseline_mb"] = base_rss
        if current is not None:
            extra["rss_slack_mb"] = max(0.0, base_rss - current)  # earlier peak above the resident size now
    for _ in range(warmup):
        step()
    _sync(dev)
    times = []
    for _ in range(repeats):
        _sync(dev)
        t0 = time.perf_counter()
        step()
        _sync(dev)
        times.append((time.perf_counter() - t0) * 1e3)
    if dev.type == "cuda":
        peak = (torch.cuda.max_memory_allocated(dev) - base_alloc) / MIB
        extra["peak_alloc_abs_mb"] = torch.cuda.max_memory_allocated(dev) / MIB
        mem_method = "cuda max_memory_allocated growth"
    else:
        peak = _maxrss_mb() - base_rss
        mem_method = "ru_maxrss growth (resident set, not tensor bytes)"
    return {"status": "ok", "time_ms": statistics.median(times), "times_ms": times, "peak_mem_mb": peak,
            "mem_method": mem_method, "threads": torch.get_num_threads(), **extra}


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)):
        return True
    text = str(exc).lower()
    return "out of memory" in text or "can't allocate memory" in text or "cannot allocate memory" in text


def _child_main(args: argparse.Namespace) -> int:
    kind, seq_len = args.one[0], int(args.one[1])
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        result = measure_case(kind, seq_len, batch=args.batch, d_model=args.d_model, n_heads=args.n_heads,
                              dtype=args.dtype, device=args.device, repeats=args.repeats, warmup=args.warmup,
                              seed=args.seed, prime_len=args.prime_len)
        code = 0
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which goes on
        oom = _is_oom(exc)
        result = {"status": "oom" if oom else "error", "message": f"{type(exc).__name__}: {exc}"[:500]}
        code = 0 if oom else 1
    print(RESULT_MARKER + json.dumps(result), flush=True)
    return code


# ----------------------------------------------------------------------------- the sweep (in the parent)

def _child_command(kind: str, seq_len: int, args: argparse.Namespace) -> list[str]:
    return [sys.executable, "-m", "models.bench_attention", "--one", kind, str(seq_len),
            "--batch", str(args.batch), "--d-model", str(args.d_model), "--n-heads", str(args.n_heads),
            "--repeats", str(args.repeats), "--warmup", str(args.warmup), "--dtype", args.dtype,
            "--device", args.device, "--seed", str(args.seed), "--threads", str(args.threads),
            "--prime-len", str(args.prime_len)]


def run_case_subprocess(kind: str, seq_len: int, args: argparse.Namespace) -> dict:
    """One case in a fresh interpreter; never raises for OOM, timeout or a failing case."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the directory holding models/
    env = dict(os.environ)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(_child_command(kind, seq_len, args), capture_output=True, text=True, env=env,
                              timeout=args.case_timeout)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "message": f"over --case-timeout {args.case_timeout:g} s (killed)"}
    wall = time.perf_counter() - t0
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_MARKER):
            result = json.loads(line[len(RESULT_MARKER):])
            result["case_wall_s"] = wall
            return result
    if proc.returncode == -signal.SIGKILL:
        return {"status": "oom", "message": "killed by SIGKILL without a result (most likely the OOM killer)"}
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"status": "error", "message": f"exit code {proc.returncode}: {tail}"[:500]}


def run_sweep(args: argparse.Namespace, lengths: list[int], log=print) -> list[dict]:
    records = []
    log(f"{'kind':<12} {'seq_len':>7} {'time_ms':>11} {'peak_mem_mb':>12} {'fwd_MFLOP/tok':>14}  status")
    for kind in args.kinds:
        failed: tuple[str, int] | None = None
        for seq_len in lengths:
            flops = make_layer(kind, d_model=args.d_model, n_heads=args.n_heads, seq_len=seq_len).flops_per_token(
                seq_len)
            if failed is not None:
                result = {"status": "skipped", "message": f"{failed[0]} at seq_len {failed[1]}"}
            else:
                result = run_case_subprocess(kind, seq_len, args)
                if result["status"] in FAILED:
                    failed = (result["status"], seq_len)
            rec = {"kind": kind, "seq_len": seq_len, "batch": args.batch, "d_model": args.d_model,
                   "n_heads": args.n_heads, "dtype": args.dtype, "device": args.device,
                   "flops_per_token_fwd": float(flops), **result}
            records.append(rec)
            ok = rec["status"] == "ok"
            log(f"{kind:<12} {seq_len:>7} {_fmt(rec.get('time_ms'), 2) if ok else '-':>11} "
                f"{_fmt(rec.get('peak_mem_mb'), 1) if ok else '-':>12} {flops / 1e6:>14.3f}  "
                f"{rec['status']}{'' if ok else ': ' + rec.get('message', '')}")
    return records


# ----------------------------------------------------------------------------- summary

def _times(records: list[dict], kind: str) -> dict[int, float | None]:
    """seq_len -> median time (ms), None where the case did not run."""
    return {r["seq_len"]: (r["time_ms"] if r["status"] == "ok" else None) for r in records if r["kind"] == kind}


def growth_ratios(times: dict[int, float | None], factor: int = GROWTH_FACTOR) -> dict[str, float]:
    """{"L->fL": time(fL) / time(L)} for every measured pair."""
    out = {}
    for length in sorted(times):
        longer = length * factor
        if times.get(length) and times.get(longer):
            out[f"{length}->{longer}"] = times[longer] / times[length]
    return out


def crossover(times: dict[int, float | None], baseline: dict[int, float | None]) -> int | None:
    """The first length from which `times` beats `baseline` at every longer measured length; None if never.

    A length counts as faster when this kind ran and the baseline either ran slower or
    did not run (oom/timeout); it does not when this kind did not run. Lengths absent
    from either side are ignored.
    """
    lengths = sorted(set(times) & set(baseline))
    first = None
    for length in lengths:
        mine, theirs = times[length], baseline[length]
        faster = mine is not None and (theirs is None or mine < theirs)
        if faster and first is None:
            first = length
        elif not faster:
            first = None
    return first


def summarize(records: list[dict], kinds: list[str], max_len: int) -> dict:
    base = _times(records, BASELINE_KIND) if BASELINE_KIND in kinds else None
    summary = {}
    for kind in kinds:
        times = _times(records, kind)
        ratios = growth_ratios(times)
        entry: dict = {"growth_8x": ratios}
        named = [f"{a}->{b}" for a, b in NAMED_GROWTH_PAIRS if f"{a}->{b}" in ratios]
        entry["exponent_8x"] = {k: math.log(v) / math.log(GROWTH_FACTOR) for k, v in ratios.items()}
        entry["named_pairs"] = named
        if kind != BASELINE_KIND:
            over = [k for k, v in ratios.items() if v > LINEAR_TIME_MAX_GROWTH]
            entry["meets_linear_growth"] = (not over) if ratios else None
            entry["pairs_over_10x"] = over
            if base is None:
                entry["crossover"] = None
                entry["crossover_text"] = "n/a (softmax not measured)"
            else:
                length = crossover(times, base)
                entry["crossover"] = length
                entry["crossover_text"] = str(length) if length is not None else f"none up to {max_len}"
                last = max(times)
                if times.get(last) and base.get(last):
                    entry[f"speedup_vs_softmax_at_{last}"] = base[last] / times[last]
        summary[kind] = entry
    return summary


# ----------------------------------------------------------------------------- output

def _fmt(value, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _cell(rec: dict, key: str, digits: int) -> str:
    return _fmt(rec[key], digits) if rec["status"] == "ok" else rec["status"]


def pivot_table(records: list[dict], kinds: list[str], lengths: list[int], key: str, digits: int, title: str) -> str:
    by = {(r["kind"], r["seq_len"]): r for r in records}
    width = max(9, *(len(str(n)) + 1 for n in lengths))
    lines = [title, f"{'kind':<12}" + "".join(f"{n:>{width}}" for n in lengths)]
    for kind in kinds:
        lines.append(f"{kind:<12}" + "".join(f"{_cell(by[(kind, n)], key, digits):>{width}}" for n in lengths))
    return "\n".join(lines)


def summary_text(summary: dict, kinds: list[str]) -> str:
    lines = [f"summary: time growth for {GROWTH_FACTOR}x the length (linear-time target <= "
             f"{LINEAR_TIME_MAX_GROWTH:g}x, quadratic -> {GROWTH_FACTOR ** 2}x), crossover vs {BASELINE_KIND}"]
    for kind in kinds:
        s = summary[kind]
        ratios = s["growth_8x"]
        parts = [f"{k}: {v:.2f}x (T^{s['exponent_8x'][k]:.2f})" for k, v in ratios.items()] or ["n/a"]
        line = f"  {kind:<12} growth " + ", ".join(parts)
        if kind != BASELINE_KIND:
            if s["meets_linear_growth"] is None:
                verdict = "n/a"
            elif s["meets_linear_growth"]:
                verdict = "yes"
            else:
                verdict = "no (" + ", ".join(s["pairs_over_10x"]) + ")"
            line += f" | <= {LINEAR_TIME_MAX_GROWTH:g}x: {verdict} | crossover: {s['crossover_text']}"
            speed = [(k, v) for k, v in s.items() if k.startswith("speedup_vs_softmax_at_")]
            if speed:
                line += f" | vs softmax at {speed[0][0].rsplit('_', 1)[1]}: {speed[0][1]:.2f}x"
        lines.append(line)
    return "\n".join(lines)


def write_csv(path: str, records: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_COLUMNS)
        for r in records:
            ok = r["status"] == "ok"
            writer.writerow([r["kind"], r["seq_len"], r["batch"], r["d_model"], r["n_heads"], r["dtype"], r["device"],
                             f"{r['time_ms']:.4f}" if ok else r["status"],
                             f"{r['peak_mem_mb']:.3f}" if ok else r["status"], f"{r['flops_per_token_fwd']:.1f}"])


def plot(path: str, records: list[dict], kinds: list[str], key: str, ylabel: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    lengths = sorted({r["seq_len"] for r in records})
    first_points = []
    for kind in kinds:
        pts = [(r["seq_len"], r[key]) for r in records
               if r["kind"] == kind and r["status"] == "ok" and r[key] is not None and r[key] > 0]
        failed = next((r for r in records if r["kind"] == kind and r["status"] in FAILED), None)
        label = kind + (f" ({failed['status']} from {failed['seq_len']})" if failed else "")
        if pts:
            ax.plot(*zip(*pts), marker="o", label=label)
            first_points.append(pts[0])
    if first_points and len(lengths) > 1:  # O(T) and O(T^2) guides from the lowest first point
        x0, y0 = min(first_points, key=lambda p: p[1])
        xs = [n for n in lengths if n >= x0]
        ax.plot(xs, [y0 * n / x0 for n in xs], ls="--", color="grey", lw=0.8, label="O(T) guide")
        ax.plot(xs, [y0 * (n / x0) ** 2 for n in xs], ls=":", color="grey", lw=0.8, label="O(T^2) guide")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(lengths)
    ax.set_xticklabels([str(n) for n in lengths])
    ax.set_xlabel("sequence length T")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(args: argparse.Namespace, lengths: list[int], records: list[dict], summary: dict) -> None:
    os.makedirs(args.out, exist_ok=True)
    write_csv(os.path.join(args.out, "attention.csv"), records)
    cpu = args.device == "cpu"
    meta = {
        "command": " ".join([os.path.basename(sys.executable), "-m", "models.bench_attention", *args.argv]),
        "kinds": args.kinds, "lengths": lengths, "batch": args.batch, "d_model": args.d_model,
        "n_heads": args.n_heads, "dtype": args.dtype, "device": args.device, "repeats": args.repeats,
        "warmup": args.warmup, "prime_len": args.prime_len, "seed": args.seed, "case_timeout_s": args.case_timeout,
        "threads": args.threads or torch.get_num_threads(), "torch": torch.__version__,
        "python": platform.python_version(), "machine": platform.machine(), "processor": platform.processor(),
        "kind_settings": {k: dataclasses.asdict(AttentionConfig(kind=k, **KIND_SETTINGS.get(k, {})))
                          for k in args.kinds},
        "time": "median over repeats of one forward + backward, host timer"
                + (", device synchronised" if not cpu else ""),
        "peak_mem_mb": ("growth of ru_maxrss (peak resident set) over a baseline right before the first measured "
                        "forward (after a --prime-len pass); resident-set growth, not exact tensor bytes") if cpu else
                       ("torch.cuda.max_memory_allocated after reset_peak_memory_stats, minus the bytes allocated "
                        "at the reset (layer, input, output gradient)"),
        "flops_per_token_fwd": "layer.flops_per_token(T): forward matmul FLOPs per token of the mixing, "
                               "no q/k/v/out projections",
    }
    with open(os.path.join(args.out, "attention.json"), "w") as f:
        json.dump({"meta": meta, "results": records, "summary": summary}, f, indent=1)
    where = f"{args.device}, {args.dtype}, batch {args.batch}, d_model {args.d_model}, {args.n_heads} heads"
    plot(os.path.join(args.out, "attention_time.png"), records, args.kinds, "time_ms",
         "forward + backward time (ms, median)", f"one attention layer, forward + backward\n({where})")
    plot(os.path.join(args.out, "attention_memory.png"), records, args.kinds, "peak_mem_mb",
         "peak memory growth (MiB, " + ("resident set via ru_maxrss)" if cpu else "max_memory_allocated)"),
         f"one attention layer, forward + backward peak memory\n({where})")


# ----------------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m models.bench_attention",
                                description="Forward + backward time and peak memory of one attention layer per "
                                            "kind and sequence length.")
    p.add_argument("--kinds", default=",".join(ATTENTION_KINDS),
                   help=f"comma-separated attention kinds (default: {','.join(ATTENTION_KINDS)})")
    p.add_argument("--min-len", type=int, default=256, help="shortest sequence length (default 256)")
    p.add_argument("--max-len", type=int, default=8192, help="longest sequence length; lengths double (default 8192)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--n-heads", type=int, default=4, help="heads (GAU is single-headed and ignores it)")
    p.add_argument("--repeats", type=int, default=3, help="timed forward + backward passes; the median is reported")
    p.add_argument("--warmup", type=int, default=1, help="untimed passes before the timed ones")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                   help="float32, or bfloat16 autocast with float32 weights")
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda or cuda:N")
    p.add_argument("--case-timeout", type=float, default=120.0,
                   help="seconds per (kind, length) case, interpreter start included (default 120)")
    p.add_argument("--seed", type=int, default=0, help="seed of the layer's weights and the random input")
    p.add_argument("--prime-len", type=int, default=64,
                   help="tokens of one untimed pass before the memory baseline, so one-off kernel and library "
                        "initialisation is not counted as the case's memory; 0 = none (default 64)")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads per case; 0 = torch's default")
    p.add_argument("--out", default="bench_attention_out", help="output directory (default ./bench_attention_out)")
    p.add_argument("--one", nargs=2, metavar=("KIND", "LEN"), help=argparse.SUPPRESS)  # internal: one case
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv
    args.kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    bad = [k for k in args.kinds if k not in ATTENTION_KINDS]
    if bad or not args.kinds:
        parser.error(f"--kinds must be a comma-separated subset of {','.join(ATTENTION_KINDS)}, got {bad or '[]'}")
    if len(set(args.kinds)) != len(args.kinds):
        parser.error("--kinds lists a kind twice")
    for name in ("min_len", "batch", "d_model", "n_heads", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.max_len < args.min_len:
        parser.error(f"--max-len ({args.max_len}) must be >= --min-len ({args.min_len})")
    if args.warmup < 0 or args.threads < 0 or args.prime_len < 0:
        parser.error("--warmup, --threads and --prime-len must be >= 0")
    if args.case_timeout <= 0:
        parser.error("--case-timeout must be > 0")
    if args.d_model % args.n_heads or (args.d_model // args.n_heads) % 2:
        parser.error(f"--d-model ({args.d_model}) / --n-heads ({args.n_heads}) must be an even integer head dim "
                     "(RoPE rotates channel pairs)")
    args.device = resolve_device(args.device)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda asked for, but torch.cuda.is_available() is false")
    if args.one is not None:
        if args.one[0] not in ATTENTION_KINDS or not args.one[1].isdigit() or int(args.one[1]) < 1:
            parser.error(f"--one needs KIND LEN, got {args.one}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.one is not None:
        return _child_main(args)
    lengths = sequence_lengths(args.min_len, args.max_len)
    print(f"attention benchmark: kinds {','.join(args.kinds)}, lengths {lengths[0]}..{lengths[-1]}, "
          f"batch {args.batch}, d_model {args.d_model}, {args.n_heads} heads, {args.dtype}, {args.device}, "
          f"median of {args.repeats} after {args.warmup} warm-up, torch {torch.__version__}, "
          f"{args.threads or torch.get_num_threads()} threads", flush=True)
    records = run_sweep(args, lengths, log=lambda s: print(s, flush=True))
    summary = summarize(records, args.kinds, lengths[-1])
    write_outputs(args, lengths, records, summary)
    mem_note = ("resident-set growth via ru_maxrss, not tensor bytes" if args.device == "cpu"
                else "max_memory_allocated growth")
    print()
    print(pivot_table(records, args.kinds, lengths, "time_ms", 2, "forward + backward time, ms (median)"))
    print()
    print(pivot_table(records, args.kinds, lengths, "peak_mem_mb", 1, f"peak memory, MiB ({mem_note})"))
    print()
    print(summary_text(summary, args.kinds))
    print(f"\nwrote {os.path.join(args.out, 'attention.csv')}, attention.json, attention_time.png, "
          f"attention_memory.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
