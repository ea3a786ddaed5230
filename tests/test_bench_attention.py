"""The attention benchmark CLI end to end (two kinds, two lengths), its failure reporting and its summary math."""

from __future__ import annotations

import csv
import json
import re
import statistics

import pytest

from bench_files import check_outputs, run_bench
from trainer.bench.attention import CSV_COLUMNS
from trainer.bench.attention_case import make_layer
from trainer.bench.attention_summary import crossover, growth_ratios

COLUMNS = ["kind", "seq_len", "batch", "d_model", "n_heads", "dtype", "device", "step_ms", "peak_mem_mb",
           "flops_per_token_fwd"]


def _run(out, *extra):
    return run_bench("attention", ["--attention", "softmax,linear", "--min-len", "256", "--seq-len", "512",
                                   "--trials", "1", "--iters", "1", "--warmup", "0", "--threads", "1",
                                   "--device", "cpu", "--out", str(out), *extra])


def _rows(out):
    with open(out / "attention.csv") as f:
        reader = csv.reader(f)
        header = next(reader)
        return header, [dict(zip(header, r)) for r in reader]


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_attention")
    return out, _run(out)


def test_csv_rows_and_columns(bench_run):
    out, stdout = bench_run
    check_outputs(out, "attention", stdout, COLUMNS)
    header, rows = _rows(out)
    assert header == COLUMNS == CSV_COLUMNS
    assert [(r["kind"], int(r["seq_len"])) for r in rows] == [
        ("softmax", 256), ("softmax", 512), ("linear", 256), ("linear", 512)]
    for r in rows:
        assert (r["batch"], r["d_model"], r["n_heads"], r["dtype"], r["device"]) == ("1", "256", "4", "float32", "cpu")
        assert float(r["step_ms"]) > 0
        assert float(r["peak_mem_mb"]) >= 0
        seq_len = int(r["seq_len"])
        expected = make_layer(r["kind"], d_model=256, n_heads=4, seq_len=seq_len).flops_per_token(seq_len)
        assert float(r["flops_per_token_fwd"]) == pytest.approx(expected, rel=1e-6)
    soft = {int(r["seq_len"]): float(r["flops_per_token_fwd"]) for r in rows if r["kind"] == "softmax"}
    assert soft[512] == pytest.approx(2 * soft[256])  # 4 H D T: linear in T


def test_png_json_and_summary(bench_run):
    out, stdout = bench_run
    png = (out / "attention.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5_000
    data = json.loads((out / "attention.json").read_text())
    assert [r["status"] for r in data["results"]] == ["ok"] * 4
    for r in data["results"]:  # one trial of one pass each, and the summary is what it gives
        assert r["trials"] == 1 and len(r["trial_s"]) == 1
        assert r["step_ms"] == pytest.approx(statistics.median(r["trial_s"]) * 1e3, rel=1e-12)
    assert "resident" in data["meta"]["peak_mem_mb"]
    assert "crossover" not in data["summary"]["softmax"]
    linear = data["summary"]["linear"]
    assert linear["crossover_text"] in ("256", "512", "none up to 512")
    # the printed summary names a crossover for every non-softmax kind, and none for softmax
    assert re.search(r"^\s*linear\s.*crossover: (256|512|none up to 512)\b", stdout, re.M), stdout
    assert not re.search(r"^\s*softmax\s.*crossover:", stdout, re.M), stdout
    assert "forward + backward time" in stdout and "peak memory" in stdout


def test_timeouts_are_reported_not_raised(tmp_path):
    _run(tmp_path, "--case-timeout", "0.2")  # no interpreter starts in 0.2 s: every first case times out
    _, rows = _rows(tmp_path)
    assert [(r["kind"], r["step_ms"], r["peak_mem_mb"]) for r in rows] == [
        ("softmax", "timeout", "timeout"), ("softmax", "skipped", "skipped"),
        ("linear", "timeout", "timeout"), ("linear", "skipped", "skipped")]
    data = json.loads((tmp_path / "attention.json").read_text())
    assert data["summary"]["linear"]["crossover_text"] == "none up to 512"


def test_crossover_and_growth():
    base = {256: 9.0, 512: 6.0, 1024: 11.0, 2048: 20.0, 4096: None}  # softmax timed out at 4096
    assert crossover({256: 10.0, 512: 5.0, 1024: 12.0, 2048: 8.0, 4096: 30.0}, base) == 2048
    assert crossover({256: 1.0, 512: 1.0, 1024: 1.0, 2048: 1.0, 4096: 1.0}, base) == 256
    assert crossover({256: 1.0, 512: 1.0, 1024: 1.0, 2048: 1.0, 4096: None}, base) is None  # both failed
    assert crossover({256: 99.0, 512: 99.0}, {256: 1.0, 512: 1.0}) is None
    assert growth_ratios({256: 2.0, 512: 3.0, 2048: 18.0, 4096: None}) == {"256->2048": 9.0}
