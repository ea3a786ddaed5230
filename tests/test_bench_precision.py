"""The precision benchmark end to end on 2 ranks (tiny model), its json and table, and its argument checks."""

from __future__ import annotations

import json
import os
import statistics
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
           "--trials", "2", "--lr", "1e-2", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads((out / "precision_bench.json").read_text()), proc.stdout


# bf16 rounds to 8 significant bits: relative 2^-9, one ulp 2^-8. The loss (~5.5 here) is a float32
# mean of cross-entropies of half logits, so a half precision's loss stays within about one bf16 ulp of
# fp32's at the same weights; its fall over the run (~1.04 at lr 1e-2 here) within two such ulps of
# fp32's fall: over ten times smaller than the fall, so a half step that does not train (lr 0, the
# update lost on the way to the float32 masters, gradients of other batches) fails.
HALF_ULP = 2.0**-8


def test_every_precision_under_every_parallelism(bench_run):
    data, _ = bench_run
    rows = {(r["parallel"], r["precision"]): r for r in data["results"]}
    assert set(rows) == {(par, prec) for par in ("ddp", "zero2") for prec in PRECISIONS}
    for (par, prec), r in rows.items():
        ref = rows[(par, "fp32")]
        # the summary is what the recorded trials give
        assert len(r["trials"]) == 2 and all(t > 0 for t in r["trials"])
        assert (r["tokens_per_s"], r["min"], r["max"]) == \
            (statistics.median(r["trials"]), min(r["trials"]), max(r["trials"]))
        assert r["ratio_vs_fp32"] == pytest.approx(statistics.median(r["trials"]) / statistics.median(ref["trials"]))
        assert r["matmul_gflops"] > 0
        # 2 trials x (1 warm-up + 1 timed) steps; at the default scale 2^16 this model's scaled fp16
        # gradients stay far below 65504, so no precision may skip a step (a skip is a false overflow)
        assert r["steps"] == 4 and r["skipped_steps"] == 0, (par, prec, r["skipped_steps"])
        # same initial weights and batches: the same start, and the loss falls as fp32's does
        fell, ref_fell = r["first_loss"] - r["last_loss"], ref["first_loss"] - ref["last_loss"]
        assert abs(r["first_loss"] - ref["first_loss"]) <= HALF_ULP * ref["first_loss"], (par, prec)
        assert ref_fell > 10 * 2 * HALF_ULP * ref["first_loss"], ref_fell  # the run trains: the check has teeth
        assert abs(fell - ref_fell) <= 2 * HALF_ULP * ref["first_loss"], (par, prec, fell, ref_fell)
    # ZeRO-2 and DDP take the same steps: their fp32 runs agree to float32 rounding
    assert rows[("zero2", "fp32")]["last_loss"] == pytest.approx(rows[("ddp", "fp32")]["last_loss"], rel=1e-5)
    assert data["meta"]["world_size"] == 2 and data["meta"]["flops_per_token"] > 0


def test_rank0_prints_one_table(bench_run):
    _, stdout = bench_run
    assert stdout.count("# precision throughput: 2 ranks") == 1
    assert "vs fp32" in stdout and stdout.count("1.00x") >= 2  # fp32's own row, once per parallelism


@pytest.mark.parametrize("args,word", [(["--precisions", "fp8"], "precisions"), (["--parallel", "fsdp"], "parallel"),
                                       (["--steps", "0"], "steps"), (["--lr", "-1"], "lr")])
def test_bad_arguments_exit_before_any_work(args, word, monkeypatch, capsys):
    from trainer.bench_precision import _args
    monkeypatch.setattr(sys, "argv", ["bench_precision", *args])
    with pytest.raises(SystemExit) as exc:  # argparse's exit, before any process group exists
        _args()
    assert exc.value.code == 2 and word in capsys.readouterr().err
