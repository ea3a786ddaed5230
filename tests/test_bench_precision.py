"""The precision benchmark end to end on 2 ranks (tiny model), its files and table, and its argument checks."""

from __future__ import annotations

import statistics

import pytest

from bench_files import SHORT, TINY, TINY_TOKENS, check_outputs, launch
from trainer.bench.precision import COLUMNS, parse_args

PRECISIONS = ["fp32", "bf16", "fp16"]


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    # tiny sizes: CPU fp16 matmuls have no fast kernel and dominate the run time
    return launch(tmp_path_factory, "precision", ["--parallel", "ddp,zero2", *TINY, *SHORT, "--lr", "1e-2"], nproc=2)


# bf16 rounds to 8 significant bits: relative 2^-9, one ulp 2^-8. The loss (~5.5 here) is a float32
# mean of cross-entropies of half logits, so a half precision's loss stays within about one bf16 ulp of
# fp32's at the same weights; its fall over the run (~1.04 at lr 1e-2 here) within two such ulps of
# fp32's fall: over ten times smaller than the fall, so a half step that does not train (lr 0, the
# update lost on the way to the float32 masters, gradients of other batches) fails.
HALF_ULP = 2.0**-8


def test_every_precision_under_every_parallelism(bench_run):
    _, _, data = bench_run
    rows = {(r["parallel"], r["precision"]): r for r in data["results"]}
    assert set(rows) == {(par, prec) for par in ("ddp", "zero2") for prec in PRECISIONS}
    for (par, prec), r in rows.items():
        ref = rows[(par, "fp32")]
        # the summary is what the recorded trials give
        t = r["trial_s"]
        assert len(t) == r["trials"] == 2 and all(s > 0 for s in t)
        assert (r["tokens_per_s"], r["step_ms_min"], r["step_ms_max"]) == \
            (2 * TINY_TOKENS / statistics.median(t), min(t) * 1e3, max(t) * 1e3)
        assert r["ratio"] == pytest.approx(statistics.median(ref["trial_s"]) / statistics.median(t))
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


def test_writes_the_output_convention_and_one_table(bench_run):
    out, stdout, _ = bench_run
    rows, _ = check_outputs(out, "precision", stdout, COLUMNS)
    assert [(r["parallel"], r["precision"]) for r in rows] == [(p, q) for p in ("ddp", "zero2") for q in PRECISIONS]
    assert stdout.count("# precision throughput: 2 ranks") == 1
    assert "throughput / fp32's" in stdout and stdout.count("1.00x") >= 2  # fp32's own row, once per parallelism


@pytest.mark.parametrize("args,word", [(["--precisions", "fp8"], "precisions"), (["--parallel", "fsdp"], "parallel"),
                                       (["--iters", "0"], "iters"), (["--lr", "-1"], "lr")])
def test_bad_arguments_exit_before_any_work(args, word, capsys):
    with pytest.raises(SystemExit) as exc:  # argparse's exit, before any process group exists
        parse_args(args)
    assert exc.value.code == 2 and word in capsys.readouterr().err
