"""The precision benchmark end to end on 2 ranks (tiny model), its json and table, and its argument checks."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
PRECISIONS = ["fp32", "bf16", "fp16"]


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("precision_bench")
    # tiny sizes: CPU fp16 matmuls have no fast kernel and dominate the run time
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "trainer.bench_precision", "--parallel", "ddp,zero2", "--d-model", "32", "--n-layers", "1",
           "--n-heads", "2", "--seq-len", "16", "--batch", "2", "--steps", "1", "--warmup", "1",
           "--trials", "2", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads((out / "precision_bench.json").read_text()), proc.stdout


def test_every_precision_under_every_parallelism(bench_run):
    data, _ = bench_run
    rows = {(r["parallel"], r["precision"]): r for r in data["results"]}
    assert set(rows) == {(par, prec) for par in ("ddp", "zero2") for prec in PRECISIONS}
    for (par, prec), r in rows.items():
        assert r["tokens_per_s"] > 0 and len(r["trials"]) == 2 and all(t > 0 for t in r["trials"])
        assert r["min"] <= r["tokens_per_s"] <= r["max"]
        assert r["ratio_vs_fp32"] == pytest.approx(r["tokens_per_s"] / rows[(par, "fp32")]["tokens_per_s"])
        assert r["skipped_steps"] >= 0 and r["matmul_gflops"] > 0
        # same weights and batches, four steps at lr 1e-4: every precision sees nearly the same loss
        assert r["last_loss"] == pytest.approx(rows[(par, "fp32")]["last_loss"], abs=0.05)
    assert data["meta"]["world_size"] == 2 and data["meta"]["flops_per_token"] > 0


def test_rank0_prints_one_table(bench_run):
    _, stdout = bench_run
    assert stdout.count("# precision throughput: 2 ranks") == 1
    assert "vs fp32" in stdout and stdout.count("1.00x") >= 2  # fp32's own row, once per parallelism


@pytest.mark.parametrize("args,word", [(["--precisions", "fp8"], "precisions"), (["--parallel", "fsdp"], "parallel"),
                                       (["--steps", "0"], "steps")])
def test_bad_arguments_exit_before_any_work(args, word, monkeypatch, capsys):
    from trainer.bench_precision import _args
    monkeypatch.setattr(sys, "argv", ["bench_precision", *args])
    with pytest.raises(SystemExit) as exc:  # argparse's exit, before any process group exists
        _args()
    assert exc.value.code == 2 and word in capsys.readouterr().err
