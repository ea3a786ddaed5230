"""The MoE benchmark end to end on 2 ranks with tiny sizes: its files, rows and the no-drop check."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from trainer.bench_moe import COLUMNS, parse_args

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_moe")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "trainer.bench_moe", "--experts", "4", "--tokens", "64", "--d-model", "32", "--hidden", "64",
           "--layers", "1", "--seq-len", "32", "--heads", "2", "--trials", "2", "--iters", "1", "--warmup", "1",
           "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return out, proc.stdout


def test_csv_rows_are_complete_and_positive(bench_run):
    out, _ = bench_run
    with open(out / "moe_bench.csv") as f:
        reader = csv.reader(f)
        header = next(reader)
        rows = [dict(zip(header, r)) for r in reader]
    assert header == COLUMNS
    layer_impls = ["ringtrain[ring]", "ringtrain[native]"] + (["deepspeed"] if HAS_DEEPSPEED else [])
    assert [(r["bench"], r["impl"]) for r in rows] == \
        [("layer", n) for n in layer_impls] + [("model", "dense"), ("model", "moe")]
    for r in rows:
        assert r["world_size"] == "2" and r["trials"] == "2"
        for key in ("step_ms", "step_ms_min", "step_ms_max", "tokens_per_s", "params"):
            assert float(r[key]) > 0, (r["impl"], key)
        assert float(r["step_ms_min"]) <= float(r["step_ms"]) <= float(r["step_ms_max"])
        assert float(r["tokens_per_s"]) == pytest.approx(2 * int(r["tokens_per_rank"]) / float(r["step_ms"]) * 1e3)
        assert 0 <= float(r["dropped_frac"]) < 1
    for r in rows[:len(layer_impls)]:
        assert float(r["max_abs_diff"]) < 1e-5, r  # same layer as the local all-experts one
        assert float(r["a2a_bytes_per_step"]) > 0 and float(r["ratio"]) > 0
    dense, moe = rows[-2:]
    assert float(dense["ratio"]) == 1.0 and float(moe["ratio"]) > 0
    # active params: the dense model's plus one router (E x d)
    assert int(moe["params"]) - int(dense["params"]) == 4 * 32


def test_json_and_printed_table(bench_run):
    out, stdout = bench_run
    data = json.loads((out / "moe_bench.json").read_text())
    assert data["meta"]["world_size"] == 2 and data["meta"]["deepspeed_error"] is None
    assert all(len(r["trial_ms"]) == 2 for r in data["results"])
    assert "# MoE layer fwd+bwd, 2 ranks" in stdout and "# full DecoderLM fwd+bwd" in stdout
    assert "ringtrain[ring]" in stdout and "wrote" in stdout
    if HAS_DEEPSPEED:
        ds = next(r for r in data["results"] if r["impl"] == "deepspeed")
        assert data["meta"]["deepspeed"] and ds["ratio"] == 1.0


@pytest.mark.parametrize("argv,key", [(["--experts", "3"], "--experts"), (["--top-k", "2", "--experts", "2"], None),
                                      (["--algorithms", "tree"], "--algorithms"), (["--tokens", "0"], "--tokens")])
def test_bad_args_name_the_flag(argv, key, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    if key is None:
        assert parse_args(argv).top_k == 2
        return
    with pytest.raises(SystemExit):
        parse_args(argv)
    assert key in capsys.readouterr().err
