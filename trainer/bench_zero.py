"""Step time and per-rank memory of ddp / zero1 / zero2 / zero3: ringtrain, DeepSpeed, Accelerate.

    python3 -m trainer.bench_zero --nproc 2,4 --steps 20 --out /tmp/zero_bench

Each (ranks, parallelism, engine) is one training launch (torchrun) of the same model
on the same synthetic batches; the figures are the mean step time over the second half
of the steps (the first half warms up) and rank 0's peak resident memory, plus
ringtrain's exact model-state bytes. Engines alternate launch by launch so slow phases
of a shared machine hit both. Writes zero_bench.csv, zero_bench.json and zero_bench.png.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

PARALLEL = ["ddp", "zero1", "zero2", "zero3"]
ENGINES = ["native", "deepspeed", "accelerate"]


def _exists(parallel: str, engine: str) -> bool:
    """Accelerate shards only through FSDP, which it runs on GPUs only; it has no stage 1."""
    import torch
    return engine != "accelerate" or parallel == "ddp" or (parallel != "zero1" and torch.cuda.is_available())


def _launch(nproc: int, parallel: str, engine: str, steps: int, extra: list[str], workdir: Path) -> dict:
    run_dir = workdir / f"{nproc}-{parallel}-{engine}"
    half = max(1, steps // 2)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "trainer.train", f"parallel={parallel}", f"engine={engine}", "data=synthetic",
           f"trainer.max_steps={steps}", f"trainer.log_every={half}", "trainer.eval_every=0",
           "trainer.eval_batches=1", "trainer.progress=false", "trainer.ckpt_every=0",
           f"hydra.run.dir={run_dir}", *extra]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1],
                       env={**os.environ, "WANDB_MODE": "disabled"})
    if r.returncode != 0:
        return {"error": (r.stderr or r.stdout)[-2000:]}
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = [x for x in rows if x["step"] == 2 * half or x["step"] == steps][-1]
    model_state = sum(v for k, v in last.items() if k.startswith("mem_") and k.endswith("_bytes"))
    return {"step_time_s": last["step_time_s"], "tokens_per_s": last["tokens_per_s"],
            "peak_mem_mb": last["peak_mem_mb"], "model_state_mb": model_state / 2**20 if model_state else None,
            "loss": last["loss"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m trainer.bench_zero", description=__doc__.split("\n")[0])
    ap.add_argument("--nproc", default="2,4", help="rank counts, comma-separated")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--parallel", default=",".join(PARALLEL))
    ap.add_argument("--out", default="runs/zero_bench")
    ap.add_argument("overrides", nargs="*", help="extra trainer overrides, e.g. model=small")
    a = ap.parse_args(argv)
    if a.steps < 2:
        ap.error("--steps must be >= 2")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="zero-bench-") as tmp:
        for nproc in [int(n) for n in a.nproc.split(",")]:
            for parallel in a.parallel.split(","):
                for engine in [e for e in ENGINES if _exists(parallel, e)]:
                    res = _launch(nproc, parallel, engine, a.steps, a.overrides, Path(tmp))
                    results.append({"ranks": nproc, "parallel": parallel, "engine": engine, **res})
                    shown = res.get("error", "").splitlines()[-1:] if "error" in res else \
                        f"{res['step_time_s'] * 1e3:.0f} ms/step, peak {res['peak_mem_mb']:.0f} MiB"
                    print(f"{nproc} ranks {parallel:>5} {engine:>9}: {shown}", flush=True)
    by = {(r["ranks"], r["parallel"], r["engine"]): r for r in results}
    lines = [f"{'ranks':>5} {'parallel':>8} | {'ms/step native':>14} {'deepspeed':>9} {'accelerate':>10} "
             f"{'speed vs DS':>11} | {'MiB native':>10} {'deepspeed':>9} {'accelerate':>10} {'mem vs DS':>9} "
             f"| {'model-state MiB':>15}"]

    def cell(r, key, scale=1.0):
        return f"{r[key] * scale:.0f}" if r and "error" not in r else "-"
    for (n, par, eng), r in by.items():
        if eng != "native" or "error" in r:
            continue
        d, a = by.get((n, par, "deepspeed")), by.get((n, par, "accelerate"))
        ok_d = d is not None and "error" not in d
        r["speed_ratio"] = d["step_time_s"] / r["step_time_s"] if ok_d else None
        r["memory_ratio"] = r["peak_mem_mb"] / d["peak_mem_mb"] if ok_d else None
        lines.append(f"{n:>5} {par:>8} | {cell(r, 'step_time_s', 1e3):>14} {cell(d, 'step_time_s', 1e3):>9} "
                     f"{cell(a, 'step_time_s', 1e3):>10} {r['speed_ratio'] or float('nan'):>10.2f}x | "
                     f"{cell(r, 'peak_mem_mb'):>10} {cell(d, 'peak_mem_mb'):>9} {cell(a, 'peak_mem_mb'):>10} "
                     f"{r['memory_ratio'] or float('nan'):>8.2f}x | {r['model_state_mb'] or 0:>15.2f}")
    table = "\n".join(lines)
    print(table)
    (out / "table.txt").write_text(table + "\n")
    (out / "zero_bench.json").write_text(json.dumps(results, indent=1))
    with open(out / "zero_bench.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["ranks", "parallel", "engine", "step_time_s", "tokens_per_s",
                                           "peak_mem_mb", "model_state_mb", "loss", "error"], extrasaction="ignore")
        w.writeheader()
        w.writerows(results)
    _plot(results, out / "zero_bench.png")
    return 0


def _plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if "error" not in r]
    labels = sorted({(r["ranks"], r["parallel"]) for r in ok}, key=lambda k: (k[0], PARALLEL.index(k[1])))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for ax, key, title in ((axes[0], "step_time_s", "step time (s)"), (axes[1], "peak_mem_mb", "peak memory, rank 0 (MiB)")):
        for j, eng in enumerate(ENGINES):
            vals = [next((r[key] for r in ok if (r["ranks"], r["parallel"], r["engine"]) == (*lab, eng)), 0)
                    for lab in labels]
            ax.bar([i + 0.27 * j for i in range(len(labels))], vals, width=0.27, label=eng)
        ax.set_xticks([i + 0.27 for i in range(len(labels))], [f"{n}r {p}" for n, p in labels], rotation=45)
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
