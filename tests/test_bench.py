"""The collective benchmark end to end on 2 ranks, its files, and its config checks."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest

from parallel.bench import BenchConfig, make_plan, parse_bytes
from parallel.collectives import TuningTable, available

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPS = ["all_reduce", "reduce_scatter", "all_gather", "all_to_all", "broadcast"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "parallel.bench", f"ops=[{','.join(OPS)}]", "algorithms=[ring,rhd,tree,native,hier,auto]",
           "min_bytes=8", "max_bytes=256K", "iters=3", "warmup=1", "dtype=float32",
           "large_min_bytes=128K", "small_max_bytes=4K", "progress=false", f"hydra.run.dir={out}"]
    proc = subprocess.run(cmd, cwd=out, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, proc.stdout


def test_results_csv_columns_and_rows(bench_run):
    out, _ = bench_run
    with open(out / "results.csv") as f:
        reader = csv.reader(f)
        header = next(reader)
        rows = [dict(zip(header, r)) for r in reader]
    assert header == ["op", "algorithm", "world_size", "dtype", "size_bytes", "count", "time_us",
                      "algbw_gbps", "busbw_gbps", "wrong"]
    factors = {"all_reduce": 1.0, "reduce_scatter": 0.5, "all_gather": 0.5, "all_to_all": 0.5, "broadcast": 1.0}
    for op in OPS:
        mine = [r for r in rows if r["op"] == op]
        assert {r["algorithm"] for r in mine} == set(available(op)) | {"auto"}
        largest = max(int(r["size_bytes"]) for r in mine)
        assert largest == 256 * 1024
        for r in mine:
            assert r["wrong"] == "0", r
            assert r["world_size"] == "2" and r["dtype"] == "float32"
            assert int(r["count"]) * 4 == int(r["size_bytes"])
            assert float(r["time_us"]) > 0
            algbw, busbw = float(r["algbw_gbps"]), float(r["busbw_gbps"])
            assert busbw == pytest.approx(algbw * factors[op], rel=1e-3, abs=1e-6)
            assert algbw == pytest.approx(int(r["size_bytes"]) / float(r["time_us"]) / 1e3, rel=1e-3, abs=1e-6)


def test_sizes_are_powers_of_two(bench_run):
    out, _ = bench_run
    data = json.loads((out / "results.json").read_text())
    sizes = sorted({r["size_bytes"] for r in data["results"] if r["op"] == "all_reduce"})
    assert sizes == [2 ** k for k in range(3, 19)]


def test_json_summary_and_plot(bench_run):
    out, stdout = bench_run
    data = json.loads((out / "results.json").read_text())
    assert data["meta"]["world_size"] == 2 and data["meta"]["memcpy_gbps"] > 0
    assert (data["meta"]["nodes"], data["meta"]["ranks_per_node"]) == (1, 2)
    assert all((r["nodes"], r["ranks_per_node"]) == (1, 2) for r in data["results"])
    ring = next(s for s in data["summary"] if s["op"] == "all_reduce" and s["algorithm"] == "ring")
    assert ring["large_sizes"] == 2 and ring["large_busbw_ratio"] > 0
    assert ring["small_sizes"] == 10 and ring["small_latency_ratio"] > 0
    assert any(s["algorithm"] == "best-of-hand-written" for s in data["summary"])
    png = (out / "busbw.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    # the printed table: nccl-tests' columns plus the algorithm, and the summary
    assert "algbw(GB/s)" in stdout and "busbw(GB/s)" in stdout and "#wrong" in stdout
    assert "summary vs native" in stdout and "memory-copy ceiling" in stdout
    assert stdout.count("all_reduce") >= 4 * 16


def test_auto_row_says_where_its_choices_come_from(bench_run):
    _, stdout = bench_run
    assert "# auto: calibration at start-up" in stdout


def test_tune_mode_writes_a_tuning_file_auto_then_follows(tmp_path):
    """mode=tune measures every algorithm and writes tuning.json; a sweep given that file runs
    auto from it; a training run given it picks, per bucket, the best algorithm it lists."""
    tune = tmp_path / "tune"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "parallel.bench", "mode=tune", "ops=[all_reduce,reduce_scatter]", "min_bytes=1K", "max_bytes=64K",
           "iters=2", "warmup=1", "progress=false", "plot=false", f"hydra.run.dir={tune}"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    table = TuningTable.load(tune / "tuning.json")
    assert (table.world_size, table.nodes, table.ranks_per_node, table.backend) == (2, 1, 2, "gloo")
    sizes = sorted({e.size_bytes for e in table.entries if e.op == "all_reduce"})
    assert sizes == [1 << k for k in range(10, 17)]
    for e in table.entries:  # every flat algorithm that has the op (hier is the ring on one node)
        assert set(e.seconds) == set(available(e.op)) - {"hier"}, e
    rows = list(csv.DictReader(open(tune / "results.csv")))
    for e in table.entries:
        fastest = min((r for r in rows if r["op"] == e.op and int(r["size_bytes"]) == e.size_bytes),
                      key=lambda r: float(r["time_us"]))
        assert e.best(e.seconds) == fastest["algorithm"]
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "parallel.bench", "ops=[all_reduce]", "algorithms=[ring,auto]", "min_bytes=1K", "max_bytes=4K",
           "iters=2", "warmup=1", "progress=false", "plot=false", f"tuning={tune / 'tuning.json'}",
           f"hydra.run.dir={sweep}"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"# auto: from {tune / 'tuning.json'}" in proc.stdout


def test_rank0_alone_writes_the_log(bench_run):
    out, _ = bench_run
    logs = [p for p in os.listdir(out) if p.endswith(".log")]
    assert logs and "wrote" in (out / logs[0]).read_text()


@pytest.mark.parametrize("text,value", [("8", 8), ("64K", 65536), ("64M", 64 << 20), ("1G", 1 << 30),
                                        (4096, 4096), ("2MiB", 2 << 20)])
def test_parse_bytes(text, value):
    assert parse_bytes(text, "x") == value


@pytest.mark.parametrize("override,key", [
    ({"ops": ["allreduce"]}, "ops"), ({"algorithms": ["butterfly"]}, "algorithms"),
    ({"max_bytes": "12Q"}, "max_bytes"), ({"min_bytes": "1M", "max_bytes": "1K"}, "max_bytes"),
    ({"dtype": "float8"}, "dtype"), ({"iters": 0}, "iters"), ({"window": 1}, "window"),
    ({"reduce_op": "avg", "dtype": "int32"}, "avg"), ({"min_bytes": "0"}, "min_bytes"),
    ({"mode": "tuning"}, "mode"), ({"calibration_s": 0}, "calibration_s"),
    ({"tuning": "/nonexistent/tuning.json"}, "tuning=/nonexistent/tuning.json: no such file"),
])
def test_bad_config_names_the_key(override, key):
    cfg = BenchConfig(**override)
    with pytest.raises(ValueError, match=key):
        make_plan(cfg)


def test_bad_config_exits_before_any_work(tmp_path):
    # everything a run could write goes under tmp_path (its own run directory and cwd)
    proc = subprocess.run([sys.executable, "-m", "parallel.bench", "ops=[allreduce]",
                           f"hydra.run.dir={tmp_path / 'a'}"], cwd=tmp_path, env=ENV, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert "ops" in proc.stderr and "Traceback" not in proc.stderr
    typo = subprocess.run([sys.executable, "-m", "parallel.bench", "iter=3", f"hydra.run.dir={tmp_path / 'b'}"],
                          cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=120)
    assert typo.returncode != 0 and "iter" in typo.stderr
    assert not any(p.name.endswith(".csv") for p in tmp_path.rglob("*"))  # no work was done
