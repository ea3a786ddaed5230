"""The context-parallel benchmark end to end on tiny settings (linear and softmax, cp 1 and 2, two
lengths), its traffic against the formula, and its summary math. No timing assertions: the
figures are whatever this machine gives; only what must hold exactly is checked."""

from __future__ import annotations

import json
import math

import pytest

from bench_files import check_outputs, launch, run_bench
from trainer.bench.context import COLUMNS, parse_args
from trainer.bench.context_summary import budget_length

D_MODEL, HEADS, LAYERS, BATCH = 32, 2, 1, 1
ARGS = ["--attention", "linear,softmax", "--softmax-methods", "ring", "--cp", "1,2", "--min-len", "256",
        "--seq-len", "512", "--d-model", str(D_MODEL), "--n-heads", str(HEADS), "--n-layers", str(LAYERS),
        "--batch", str(BATCH), "--warmup", "0", "--iters", "1", "--trials", "1", "--prime-len", "64",
        "--case-timeout", "120"]


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    return launch(tmp_path_factory, "context", [*ARGS, "--mem-budget-mb", "1"], timeout=600)


def _by(data) -> dict:
    return {(r["variant"], r["cp"], r["seq_len"]): r for r in data["results"]}


def test_outputs_and_rows(bench_run):
    out, stdout, data = bench_run
    rows, _ = check_outputs(out, "context", stdout, COLUMNS)
    assert [(r["variant"], r["cp"], r["seq_len"]) for r in rows] == [
        (v, str(cp), str(n)) for n in (256, 512) for v in ("linear", "softmax[ring]") for cp in (1, 2)]
    failed = [(r["variant"], r["cp"], r["seq_len"], r["message"]) for r in rows if r["status"] != "ok"]
    assert not failed, failed
    for r in data["results"]:
        assert r["tokens_per_s"] > 0 and r["mem_mb"] >= 0 and math.isfinite(r["last_loss"])
        assert len(r["mem_mb_ranks"]) == r["cp"] and r["steps"] == 1
        assert r["tokens_per_s"] == pytest.approx(BATCH * r["seq_len"] / (r["step_ms"] / 1e3), rel=1e-9)


def test_cp_bytes_match_the_formula(bench_run):
    _, _, data = bench_run
    by = _by(data)
    for (variant, cp, n), r in by.items():
        if cp == 1:  # no cp group, no cp traffic
            assert r["cp_bytes_per_layer"] == 0 == r["cp_bytes_expected"] and r["cp_wait_ms_per_step"] == 0
        else:  # every rank of the cp group sends the same
            assert len(set(r["cp_bytes_ranks"])) == 1, r["cp_bytes_ranks"]
    D, K = D_MODEL // HEADS, 2
    state = BATCH * HEADS * (D * D + D) * 4  # linear: S (F x D, F = D) and z (F) per head
    for n in (256, 512):  # one all-gather forward + one reduce-scatter backward, whatever T
        assert by[("linear", 2, n)]["cp_bytes_per_layer"] == by[("linear", 2, n)]["cp_bytes_expected"] \
            == 2 * (K - 1) * state
    ring = [by[("softmax[ring]", 2, n)] for n in (256, 512)]
    assert ring[1]["cp_bytes_per_layer"] == 2 * ring[0]["cp_bytes_per_layer"] > 0  # K/V blocks: O(T)
    assert all(r["cp_bytes_per_layer"] == r["cp_bytes_expected"] for r in ring)


def test_summary_lines(bench_run):
    _, stdout, data = bench_run
    for line in ("(a) longest length under 1 MiB per rank", "(b) cp bytes per layer per step constant in T",
                 "(c) softmax ring vs allgather", "(d) scaling efficiency"):
        assert line in stdout
    assert "  linear cp=2" in stdout and data["summary"]["bytes"]["linear cp=2"]["met"] is True
    assert data["summary"]["bytes"]["linear cp=2"]["spread"] == 0
    assert set(data["summary"]["scaling"]) == {"linear", "softmax[ring]"}
    assert all(s["seq_len"] == 512 for s in data["summary"]["scaling"].values())
    assert "no length ran with both methods" in stdout  # allgather was not asked for


def test_resume_resummarizes_without_running_a_case(bench_run, tmp_path):
    out, _, data = bench_run
    (tmp_path / "cases.jsonl").write_text((out / "cases.jsonl").read_text())
    stdout = run_bench("context", [*ARGS, "--mem-budget-mb", "2", "--out", str(tmp_path), "--resume"])
    again = json.loads((tmp_path / "context.json").read_text())
    assert "8 of 8 cases reused from cases.jsonl" in stdout and "under 2 MiB per rank" in stdout
    assert [r["step_ms"] for r in again["results"]] == [r["step_ms"] for r in data["results"]]


def test_budget_length_interpolates_on_the_log_log_curve():
    mem = {1024: 100.0, 2048: 200.0, 4096: 400.0}
    assert budget_length(mem, 300.0) == (2048, pytest.approx(3072.0), "interpolated")
    assert budget_length(mem, 800.0) == (4096, pytest.approx(8192.0), "extrapolated")
    assert budget_length(mem, 50.0) == (None, pytest.approx(512.0), "extrapolated")  # from the two first
    assert budget_length({1024: 100.0}, 300.0) == (1024, None, "none")


def test_a_layout_that_cannot_split_stops_at_parsing(capsys):
    with pytest.raises(SystemExit) as stop:  # 512 tokens over 4 ranks: 128 each, under one GAU chunk of 256
        parse_args(["--attention", "gau", "--cp", "1,4", "--min-len", "512", "--seq-len", "512"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "--cp" in err and "attention.chunk_size" in err, err
