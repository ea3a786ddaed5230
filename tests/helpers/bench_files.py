"""The output convention every benchmark follows (trainer/bench/output.py), checked one way for all."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = str(Path(__file__).resolve().parents[2])
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
# the tiny model the training benchmarks' tests run (2 x 16 tokens per rank and step), and a short run
TINY = ["--d-model", "32", "--n-layers", "1", "--n-heads", "2", "--seq-len", "16", "--batch", "2"]
TINY_TOKENS = 2 * 16
SHORT = ["--iters", "1", "--warmup", "1", "--trials", "2"]


def run_bench(module: str, args: list[str], nproc: int = 0, timeout: float = 300) -> str:
    """Runs `python -m trainer.bench.<module> args` (under torchrun with nproc ranks when nproc > 0)
    from the checkout; returns its stdout, failing with its output when it fails."""
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc else []
    proc = subprocess.run([sys.executable, *launcher, "-m", f"trainer.bench.{module}", *args], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


def launch(tmp_path_factory, module: str, args: list[str], nproc: int = 0, timeout: float = 300):
    """(out folder, stdout, <module>.json) of one run of the benchmark into a fresh folder."""
    out = tmp_path_factory.mktemp(f"bench_{module}")
    stdout = run_bench(module, [*args, "--out", str(out)], nproc=nproc, timeout=timeout)
    return out, stdout, json.loads((out / f"{module}.json").read_text())


def check_outputs(out: Path, name: str, stdout: str, columns: list[str]) -> tuple[list[dict], dict]:
    """table.txt is the printed table; <name>.csv has `columns` and one row per result in
    <name>.json, which holds args, meta and results; <name>.png is a real plot. Returns
    (csv rows, json)."""
    table = (out / "table.txt").read_text().strip()
    assert table and stdout.count(table) == 1, (table, stdout)
    with open(out / f"{name}.csv") as f:
        reader = csv.reader(f)
        header = next(reader)
        rows = [dict(zip(header, r)) for r in reader]
    assert header == columns
    data = json.loads((out / f"{name}.json").read_text())
    assert {"args", "meta", "results"} <= set(data) and data["args"]["out"] == str(out)
    assert len(data["results"]) == len(rows) > 0
    png = (out / f"{name}.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5_000, name
    return rows, data
