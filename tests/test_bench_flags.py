"""The flags every benchmark shares (trainer/bench/flags.py): one spelling, one check, before any work."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

from bench_files import ENV, ROOT

BENCHMARKS = ["ddp", "zero", "precision", "moe", "attention"]


def _parse(module: str, argv: list[str]):
    return importlib.import_module(f"trainer.bench.{module}").parse_args(argv)


@pytest.mark.parametrize("module", BENCHMARKS)
@pytest.mark.parametrize("argv,flag", [
    (["--iters", "0"], "--iters"), (["--trials", "0"], "--trials"), (["--warmup", "-1"], "--warmup"),
    (["--batch", "two"], "--batch"), (["--attention", "mamba"], "--attention"),
    (["--d-model", "30", "--n-heads", "4"], "--d-model must be divisible by --n-heads=4"),
    (["--d-model", "12", "--n-heads", "4"], "--n-heads must give an even head dim"),
])
def test_every_benchmark_checks_the_shared_flags(module, argv, flag, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(SystemExit) as exc:
        _parse(module, argv)
    assert exc.value.code == 2 and flag in capsys.readouterr().err


@pytest.mark.parametrize("module", BENCHMARKS)
def test_every_benchmark_takes_the_same_run_options(module, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    a = _parse(module, ["--warmup", "0", "--iters", "3", "--trials", "2", "--seed", "7", "--out", "/tmp/x",
                        "--d-model", "64", "--n-heads", "2", "--batch", "3", "--seq-len", "512"])
    assert (a.warmup, a.iters, a.trials, a.seed, a.out, a.d_model, a.n_heads, a.batch, a.seq_len) == \
        (0, 3, 2, 7, "/tmp/x", 64, 2, 3, 512)


def test_a_benchmark_refuses_shape_flags_it_does_not_use(capsys):
    with pytest.raises(SystemExit):
        _parse("attention", ["--n-layers", "2"])  # one attention layer: there are no layers to count
    assert "--n-layers" in capsys.readouterr().err
    assert _parse("attention", ["--attention", "gau,linear"]).attention == ["gau", "linear"]
    assert _parse("ddp", ["--attention", "gau"]).attention == "gau"


def test_a_bad_value_ends_the_run_before_any_work(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "trainer.bench.ddp", "--iters", "0", "--out", str(out)], cwd=ROOT,
                          env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--iters" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()
