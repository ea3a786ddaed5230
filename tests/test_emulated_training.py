"""hier and auto for real: on an emulated cluster (launch/emulate_cluster.sh: network
namespaces as nodes, their links shaped), the collectives are exact and training follows
the single-process reference. Needs root and `ip`/`tc` (CI runs as root); skips otherwise."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from emulator import emulate, emulator_available, namespaces, scrub_since

ROOT = Path(__file__).resolve().parents[1]
REASON = emulator_available()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"emulated cluster unavailable: {REASON}")


@pytest.fixture(autouse=True)
def _no_namespace_outlives_a_test():
    """Whatever a test's runs leave (a failing test, a mutant of the cleanup) goes after it."""
    before = set(namespaces())
    yield
    scrub_since(before)


BENCH = ["-m", "parallel.bench", "ops=[all_reduce,reduce_scatter,all_gather]", "algorithms=[ring,native,hier,auto]",
         "min_bytes=8", "max_bytes=1M", "iters=2", "warmup=1", "progress=false", "plot=false", "calibration_s=2"]
TRAIN = ["-m", "trainer.train", "model=tiny", "trainer.progress=false", "optim.warmup_steps=2", "trainer.max_steps=10",
         "trainer.log_every=1", "trainer.eval_every=0", "trainer.eval_batches=1", "parallel.bucket_mb=0.05",
         "parallel.first_bucket_mb=0.01", "parallel.calibration_s=2"]


def _ok(cp):
    assert cp.returncode == 0, f"exit {cp.returncode}\n{cp.stdout[-3000:]}\n{cp.stderr[-5000:]}"


@pytest.mark.parametrize("nnodes, nproc", [(2, 2), (3, 1)])
def test_hier_and_auto_are_exact_on_an_emulated_cluster(tmp_path, nnodes, nproc):
    _ok(emulate(nnodes, nproc, "2gbit", BENCH + [f"hydra.run.dir={tmp_path}"], timeout=400, cwd=ROOT))
    data = json.loads((tmp_path / "results.json").read_text())
    assert (data["meta"]["nodes"], data["meta"]["ranks_per_node"]) == (nnodes, nproc)
    rows = data["results"]
    assert {(r["op"], r["algorithm"]) for r in rows} == {
        (op, a) for op in ("all_reduce", "reduce_scatter", "all_gather") for a in ("ring", "native", "hier", "auto")}
    wrong = [r for r in rows if r["wrong"] != 0]
    assert not wrong, wrong[:3]
    for op in ("all_reduce", "reduce_scatter", "all_gather"):  # 8 B .. 1 MiB (sizes that round alike once)
        sizes = sorted(r["size_bytes"] for r in rows if r["algorithm"] == "hier" and r["op"] == op)
        assert len(sizes) >= 16 and sizes[-1] > (1 << 20) - 64, (op, sizes)  # rounded to the ranks


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("one-rank")
    cp = subprocess.run([sys.executable, *TRAIN, "trainer.micro_batch_size=8", f"hydra.run.dir={run_dir}"], cwd=ROOT,
                        capture_output=True, text=True, timeout=300, env={**os.environ, "WANDB_SILENT": "true"})
    _ok(cp)
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("algorithm, parallel", [("hier", "ddp"), ("auto", "ddp"), ("hier", "zero2")])
def test_training_on_an_emulated_2x2_cluster_follows_one_rank(tmp_path, one_rank, algorithm, parallel):
    # rank r of 4 takes windows r, r+4, ...: four batches of 2 are the one rank's batch of 8;
    # zero2 reduce-scatters and all-gathers hierarchically
    _ok(emulate(2, 2, "2gbit", TRAIN + ["trainer.micro_batch_size=2", f"parallel={parallel}",
                                         f"parallel.algorithm={algorithm}", f"hydra.run.dir={tmp_path}"],
                timeout=400, cwd=ROOT))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    four = [r["loss"] for r in records]
    # hier: only each rank's piece leaves the node, a quarter of what it sends in all
    assert all(0 < r["inter_node_bytes_per_step"] < r["comm_bytes_per_step"] for r in records)
    assert len(four) == len(one_rank) == 10
    rel = max(abs(a - b) / abs(b) for a, b in zip(four, one_rank))
    assert rel <= 1e-5, (rel, four, one_rank)
    record = json.loads((tmp_path / "collectives.json").read_text())
    assert record["layout"] == "2 nodes x 2 ranks"
    algos = {b["algorithm"] for b in record["buckets"]}
    assert algos == {"hier"} if algorithm == "hier" else algos <= {"ring", "rhd", "tree", "native", "hier"}
    ops = {b["op"] for b in record["buckets"]}
    assert ops == ({"all_reduce"} if parallel == "ddp" else {"reduce_scatter", "all_gather"})
