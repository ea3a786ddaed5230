"""The ZeRO benchmark end to end (tiny model, 2 ranks, ddp and zero2): one launch per engine, its
files, ringtrain's exact model-state bytes, and every engine training the same steps."""

from __future__ import annotations

import pytest
import torch

from bench_files import TINY, check_outputs, launch
from trainer.bench.zero import COLUMNS, parse_args, refusal

ACCELERATE_ZERO2 = refusal(2, "zero2", "accelerate", "fp32")  # FSDP: GPUs only
KEYS = [("ddp", "native"), ("ddp", "deepspeed"), ("ddp", "accelerate"), ("zero2", "native"), ("zero2", "deepspeed")] \
    + ([] if ACCELERATE_ZERO2 else [("zero2", "accelerate")])


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    return launch(tmp_path_factory, "zero", ["--nproc", "2", "--parallel", "ddp,zero2", "--engines",
                                             "native,deepspeed,accelerate", *TINY, "--iters", "2", "--warmup", "1"],
                  timeout=600)


def test_writes_the_output_convention(bench_run):
    out, stdout, _ = bench_run
    rows, data = check_outputs(out, "zero", stdout, COLUMNS)
    assert [(r["parallel"], r["engine"]) for r in rows] == KEYS and all(r["error"] == "" for r in rows)
    if ACCELERATE_ZERO2:  # what the trainer refuses here is listed, not launched
        assert "GPU" in ACCELERATE_ZERO2
        assert data["meta"]["skipped"] == [f"2 ranks zero2 accelerate: {ACCELERATE_ZERO2}"]
        assert "skipped: 2 ranks zero2 accelerate" in stdout


def test_rows_summarise_their_launches(bench_run):
    rows = bench_run[2]["results"]
    peers = {r["parallel"]: r for r in rows if r["engine"] == "deepspeed"}
    for r in rows:
        (launch,) = r["launches"]  # one round: one launch, its one timed trial
        assert r["trial_s"] == [launch["step_s"]] and r["step_ms"] == launch["step_s"] * 1e3 and r["trials"] == 1
        assert launch["steps"] == 3 and r["peak_mem_mb"] >= r["mem_growth_mb"] > 0  # 1 warm-up + 2 timed
        peer = peers[r["parallel"]]
        assert r["ratio"] == pytest.approx(peer["step_ms"] / r["step_ms"])
        assert r["mem_ratio"] == pytest.approx(r["mem_growth_mb"] / peer["mem_growth_mb"])


def test_model_state_bytes_follow_the_formula(bench_run):
    # fp32 AdamW, Psi parameters, N = 2: DDP 16 Psi exactly (parameters, gradient buckets, two moments);
    # ZeRO-2 4 Psi + 12 Psi / N up to the padding of each unit to a multiple of N
    rows = {(r["parallel"], r["engine"]): r for r in bench_run[2]["results"]}
    psi = rows[("ddp", "native")]["params"]
    assert rows[("ddp", "native")]["model_state_mb"] * 2**20 == 16 * psi
    zero2 = rows[("zero2", "native")]["model_state_mb"] * 2**20
    assert 0 <= zero2 - (4 + 12 / 2) * psi <= 0.02 * (4 + 12 / 2) * psi, (zero2, psi)
    assert all(r["model_state_mb"] is None for (_, engine), r in rows.items() if engine != "native")


def test_every_engine_takes_the_same_steps(bench_run):
    # the same weights, batches, AdamW and clipping: DeepSpeed and Accelerate follow the native engine
    # up to the order of float32 sums, at both stages, over a fall far larger than that
    rows = bench_run[2]["results"]
    ref = next(r for r in rows if (r["parallel"], r["engine"]) == ("ddp", "native"))
    assert ref["first_loss"] - ref["last_loss"] > 0.05, ref  # 3 steps at lr 1e-3 train: the check has teeth
    for r in rows:
        assert r["first_loss"] == pytest.approx(ref["first_loss"], rel=1e-6), (r["parallel"], r["engine"])
        assert r["last_loss"] == pytest.approx(ref["last_loss"], rel=1e-5), (r["parallel"], r["engine"])


@pytest.mark.parametrize("argv,flag", [(["--nproc", "2,0"], "--nproc"), (["--engines", "fsdp"], "--engines"),
                                       (["--parallel", "zero4"], "--parallel")])
def test_bad_args_name_the_flag(argv, flag, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(argv)
    assert exc.value.code == 2 and flag in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusals below are the CPU ones")
def test_refusals_are_the_trainers():
    assert "does not exist" in refusal(2, "zero1", "accelerate", "fp32")
    assert "GPU" in refusal(2, "ddp", "deepspeed", "fp16")
    assert refusal(2, "zero3", "deepspeed", "bf16") is None and refusal(4, "ddp", "accelerate", "fp32") is None
