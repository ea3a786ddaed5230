"""Step time and per-rank memory of ddp / zero1 / zero2 / zero3: ringtrain, DeepSpeed and Accelerate.

    python -m trainer.bench.zero --nproc 2,4 --out runs/bench/zero

Each (ranks, parallelism, engine) is its own torchrun launch of this module's worker (`--one`),
so every engine's memory is its own process's. The worker builds the model and its batch
(trainer/bench/common.py) and the engine through `build_engine` (native, deepspeed or
accelerate: each engine's own `train_step`), and times --warmup + --iters steps
(parallel/bench/timing.py: mean over ranks). Launches are interleaved: --trials rounds, each
launching every configuration once in the same order, so a slow phase of the machine hits
every engine; figures are medians over the rounds and `ratio` is the throughput over
DeepSpeed's at the same ranks and parallelism.

Memory, per rank (the largest over ranks, the largest over rounds): `peak_mem_mb` the
process's peak (CUDA: max_memory_allocated; CPU: the peak resident set, libraries included);
`mem_growth_mb` its growth over a baseline taken after the imports and before the model
(parallel/bench/timing.py PeakMemory), and `mem_ratio` that growth over DeepSpeed's;
`model_state_mb` ringtrain's exact bytes of parameters, gradients and optimizer states (the
other engines do not expose theirs). Combinations the trainer refuses on this machine
(Accelerate has no stage 1 and runs FSDP on GPUs only, DeepSpeed's fp16 needs a GPU) are
listed and skipped: the trainer's own config checks decide.
"""

from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

from parallel.bench.timing import PeakMemory, peak_memory_mb
from parallel.process_group import abort_process

from ..config import ParallelConfig, PrecisionConfig, TrainConfig, check_launch
from ..structured import ConfigError
from . import common, flags, output

PARALLEL = ("ddp", "zero1", "zero2", "zero3")
ENGINES = ("native", "deepspeed", "accelerate")
COLUMNS = ["ranks", "parallel", "engine", "precision", "step_ms", "step_ms_min", "step_ms_max", "trials",
           "tokens_per_s", "ratio", "peak_mem_mb", "mem_growth_mb", "mem_ratio", "model_state_mb", "first_loss",
           "last_loss", "error"]
FORWARDED = (*flags.SHAPE, "warmup", "iters", "seed", "precision", "algorithm", "bucket_mb", "lr")


def _rank_counts(text: str) -> list[int]:
    try:
        counts = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"takes a comma-separated list of rank counts >= 1, got {text!r}")
    return counts


def parse_args(argv=None):
    ap = flags.parser("zero", __doc__, shape=tuple(flags.SHAPE), defaults={"trials": 1, "iters": 10, "warmup": 3})
    ap.add_argument("--nproc", type=_rank_counts, default="2,4", help="rank counts, one launch each")
    ap.add_argument("--parallel", type=flags.names(PARALLEL), default=",".join(PARALLEL))
    ap.add_argument("--engines", type=flags.names(ENGINES), default=",".join(ENGINES))
    ap.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    ap.add_argument("--algorithm", choices=("ring", "rhd", "tree", "native"), default="ring",
                    help="ringtrain's collective algorithm (the native engine)")
    ap.add_argument("--bucket-mb", type=flags.number(float, 0, above=True), default=25.0)
    ap.add_argument("--lr", type=flags.number(float, 0, above=True), default=1e-3, help="AdamW learning rate")
    ap.add_argument("--launch-timeout", type=flags.number(float, 0, above=True), default=600.0,
                    help="seconds one launch may take")
    ap.add_argument("--one", nargs=3, metavar=("PARALLEL", "ENGINE", "RESULT"), help=argparse.SUPPRESS)
    return flags.parse(ap, argv)


def refusal(ranks: int, parallel: str, engine: str, precision: str) -> str | None:
    """Why the trainer would refuse this launch on this machine (None: it runs)."""
    tc = TrainConfig(parallel=ParallelConfig(name=parallel), precision=PrecisionConfig(name=precision), engine=engine)
    try:
        tc.validate()
        check_launch(tc, world_size=ranks, cuda=torch.cuda.is_available())
    except (ValueError, ConfigError) as e:
        return str(e)
    return None


# -- the worker: one launch ------------------------------------------------------------------

def worker(a) -> int:
    parallel, engine, result = a.one
    if engine != "native":
        importlib.import_module(engine)  # its libraries belong to the baseline, not to the engine's memory
    with common.distributed() as ctx:
        memory = PeakMemory(ctx.device)
        mesh = common.topology(ctx)
        comms = mesh.communicators(algorithm=a.algorithm)
        model = common.build_model(a, ctx.device)
        params = sum(p.numel() for p in model.parameters())
        contender = common.engine_contender(engine, model, comms, a, ctx.device,
                                            common.FixedBatch(a, ctx.rank, ctx.device), parallel=parallel,
                                            precision=a.precision, algorithm=a.algorithm, bucket_mb=a.bucket_mb)
        (step_s,) = common.time_steps({engine: contender}, a, ctx.device)[engine]
        state = sum(contender.engine.model_state_bytes().values())
        largest = torch.tensor([memory.growth_mb(), peak_memory_mb(ctx.device), state], dtype=torch.float64,
                               device=ctx.device)
        dist.all_reduce(largest, op=dist.ReduceOp.MAX)
        first, last = common.losses({engine: contender}, mesh.group("dp"), ctx.device)[engine]
        if ctx.is_main:
            growth, peak, state = largest.tolist()
            Path(result).write_text(json.dumps({
                "step_s": step_s, "peak_mem_mb": peak, "mem_growth_mb": growth,
                "model_state_mb": state / 2**20 if state else None, "first_loss": first, "last_loss": last,
                "steps": contender.steps, "params": params, "engine_describe": contender.engine.describe()}))
        contender.close()
    return 0


# -- the parent: every launch ------------------------------------------------------------------

def _launch(a, ranks: int, parallel: str, engine: str, result: Path) -> dict:
    cwd, env = flags.child_env()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
           "-m", "trainer.bench.zero", "--one", parallel, engine, str(result), "--trials", "1",
           *flags.argv_of(a, FORWARDED)]
    try:
        proc = subprocess.run(cmd, cwd=cwd, env={**env, "WANDB_MODE": "disabled"}, capture_output=True, text=True,
                              timeout=a.launch_timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout: over --launch-timeout {a.launch_timeout:g} s"}
    if proc.returncode != 0 or not result.exists():
        tail = (proc.stderr.strip() or proc.stdout.strip() or "no output").splitlines()[-1]
        return {"error": f"exit status {proc.returncode}: {tail}"[:500]}
    return json.loads(result.read_text())


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.one is not None:
        return worker(a)
    plan = [(n, par, eng) for n in a.nproc for par in a.parallel for eng in a.engines]
    skipped = {key: why for key in plan if (why := refusal(*key, a.precision))}
    for (n, par, eng), why in skipped.items():
        print(f"skipped: {n} ranks {par} {eng}: {why}", flush=True)
    launches: dict[tuple, list[dict]] = {key: [] for key in plan if key not in skipped}
    with tempfile.TemporaryDirectory(prefix="bench-zero-") as tmp:
        for trial in range(a.trials):
            for i, (n, par, eng) in enumerate(launches):
                res = _launch(a, n, par, eng, Path(tmp) / f"{trial}-{i}.json")
                launches[(n, par, eng)].append(res)
                shown = res.get("error") or f"{res['step_s'] * 1e3:.0f} ms/step, growth {res['mem_growth_mb']:.0f} MiB"
                print(f"round {trial + 1}/{a.trials}: {n} ranks {par:>5} {eng:>10}: {shown}", flush=True)
    rows = [_row(a, key, runs) for key, runs in launches.items()]
    output.ratios(rows, lambda r: r["engine"] == "deepspeed", group=lambda r: (r["ranks"], r["parallel"]))
    peers = {(r["ranks"], r["parallel"]): r for r in rows if r["engine"] == "deepspeed" and not r["error"]}
    for r in rows:
        peer = peers.get((r["ranks"], r["parallel"]))
        r["mem_ratio"] = r["mem_growth_mb"] / peer["mem_growth_mb"] if peer and not r["error"] else None
    _report(a, rows, output.run_meta(skipped=[f"{n} ranks {p} {e}: {why}" for (n, p, e), why in skipped.items()]))
    return 0


def _row(a, key: tuple, runs: list[dict]) -> dict:
    n, par, eng = key
    row = {"ranks": n, "parallel": par, "engine": eng, "precision": a.precision, "launches": runs}
    ok = [r for r in runs if "error" not in r]
    if len(ok) < len(runs):
        return {**row, "error": next(r["error"] for r in runs if "error" in r), "mem_growth_mb": None}
    biggest = {k: max(r[k] for r in ok) for k in ("peak_mem_mb", "mem_growth_mb")}
    return {**row, **output.timed([r["step_s"] for r in ok], a.batch * a.seq_len * n), **biggest,
            "model_state_mb": ok[0]["model_state_mb"], "first_loss": ok[-1]["first_loss"],
            "last_loss": ok[-1]["last_loss"], "steps": ok[-1]["steps"], "params": ok[-1]["params"], "error": None}


def _report(a, rows: list[dict], meta: dict) -> None:
    title = (f"# ZeRO: {a.attention}, d_model {a.d_model} x {a.n_layers} layers, batch {a.batch} x {a.seq_len} per "
             f"rank, {a.precision}, {a.warmup} + {a.iters} steps per launch, median of {a.trials} interleaved "
             f"round(s); ratio = throughput / DeepSpeed's, mem ratio = memory growth / DeepSpeed's")
    table = output.text_table(
        ["ranks", "parallel", "engine", "ms/step", "[min, max]", "ratio", "peak MiB", "growth MiB", "mem ratio",
         "model-state MiB", "last loss"],
        [[str(r["ranks"]), r["parallel"], r["engine"]] + (["error"] + ["-"] * 7 if r["error"] else [
            f"{r['step_ms']:.0f}", f"[{r['step_ms_min']:.0f}, {r['step_ms_max']:.0f}]",
            output.cell(r["ratio"], ".2f", "x"), f"{r['peak_mem_mb']:.0f}", f"{r['mem_growth_mb']:.0f}",
            output.cell(r["mem_ratio"], ".2f", "x"), output.cell(r["model_state_mb"], ".2f"), f"{r['last_loss']:.4f}"])
         for r in rows], title)
    for r in rows:
        if r["error"]:
            table += f"\nerror: {r['ranks']} ranks {r['parallel']} {r['engine']}: {r['error']}"
    if meta["skipped"]:
        table += "\nskipped: " + "; ".join(meta["skipped"])
    fig, axes = output.subplots(2)
    groups = list(dict.fromkeys(f"{r['ranks']}r {r['parallel']}" for r in rows))
    for ax, key, label in zip(axes, ("step_ms", "mem_growth_mb"), ("ms/step (median)", "memory growth, MiB")):
        series = {eng: [next((r.get(key) for r in rows if f"{r['ranks']}r {r['parallel']}" == g and r["engine"] == eng),
                             None) for g in groups] for eng in a.engines}
        output.bars(ax, groups, series, label, f"ZeRO stages per engine: {label}")
    output.write(a.out, "zero", args=a, meta=meta, results=rows, columns=COLUMNS, table=table, figure=fig)


if __name__ == "__main__":
    abort_process(None, exit_code=main() or 0)  # no interpreter teardown: see trainer/train.py
