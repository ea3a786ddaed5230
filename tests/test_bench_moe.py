"""The MoE benchmark end to end on 2 ranks with tiny sizes: its files, rows and the no-drop check."""

from __future__ import annotations

import importlib.util
import math
import statistics

import pytest
import torch

from bench_files import SHORT, check_outputs, launch
from models.config import MoEConfig
from models.moe import MoELayer, route
from trainer.bench.moe import COLUMNS, parse_args

HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
W, E, T, D, H, CF = 2, 4, 64, 32, 64, 1.25  # the run below: ranks, experts, tokens per rank, d_model, hidden


def _ringtrain_a2a_bytes(rank: int) -> int:
    """What rank `rank` must send per fwd+bwd step: the bench's layer (seed 0) and tokens (seed 1 + rank)
    routed here. Counts (E int64, the remote half), then rows: forward out and back, backward the same."""
    torch.manual_seed(0)
    layer = MoELayer(D, H, MoEConfig(num_experts=E, top_k=1, capacity_factor=CF, eval_capacity_factor=float(E)))
    counts = []
    for r in range(W):
        x = torch.randn(T, D, generator=torch.Generator().manual_seed(1 + r))
        counts.append(route(layer.router_logits(x), 1, CF).counts.view(W, E // W).sum(1))
    sent = int(counts[rank].sum() - counts[rank][rank])              # my rows to the other ranks' experts
    returned = sum(int(counts[r][rank]) for r in range(W) if r != rank)  # their rows, sent back
    return 2 * (sent + returned) * D * 4 + (E - E // W) * 8


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    return launch(tmp_path_factory, "moe", ["--experts", "4", "--batch", "2", "--seq-len", "32", "--d-model", "32",
                                            "--mlp-ratio", "2", "--n-layers", "1", "--n-heads", "2", *SHORT], nproc=2)


def test_csv_rows_are_complete_and_positive(bench_run):
    out, stdout, _ = bench_run
    rows, _ = check_outputs(out, "moe", stdout, COLUMNS)
    layer_impls = ["ringtrain[ring]", "ringtrain[native]"] + (["deepspeed"] if HAS_DEEPSPEED else [])
    assert [(r["bench"], r["impl"]) for r in rows] == \
        [("layer", n) for n in layer_impls] + [("model", "dense"), ("model", "moe")]
    for r in rows:
        assert r["world_size"] == "2" and r["trials"] == "2"
        for key in ("step_ms", "step_ms_min", "step_ms_max", "tokens_per_s", "params"):
            assert float(r[key]) > 0, (r["impl"], key)
        assert float(r["tokens_per_s"]) == pytest.approx(2 * int(r["tokens_per_rank"]) / float(r["step_ms"]) * 1e3)
        assert 0 <= float(r["dropped_frac"]) < 1
    for r in rows[:len(layer_impls)]:
        assert float(r["max_abs_diff"]) < 1e-5, r  # same layer as the local all-experts one
        assert int(r["params"]) == E // W * 2 * D * H + E * D  # its two experts and the router
        assert float(r["dropped_frac"]) == 0  # capacity 20 holds every expert's share here
    # bytes each rank sends per step: ringtrain exactly the kept rows (rank 0's count is recorded),
    # whatever the all-to-all algorithm; DeepSpeed 4 all-to-alls of (E, capacity, d) float32
    for r in rows[:2]:
        assert float(r["a2a_bytes_per_step"]) == _ringtrain_a2a_bytes(0), r["impl"]
    if HAS_DEEPSPEED:
        assert float(rows[2]["a2a_bytes_per_step"]) == 4 * E * math.ceil(T / E * CF) * D * 4 * (W - 1) / W
    dense, moe = rows[-2:]
    # active params: the dense model's plus one router (E x d)
    assert int(moe["params"]) - int(dense["params"]) == 4 * 32
    # ratios are throughput over the peer's (DeepSpeed's layer, the dense model): its step time over theirs
    peer = rows[2] if HAS_DEEPSPEED else None
    for r in rows:
        base = dense if r["bench"] == "model" else peer
        if base is not None:
            assert float(r["ratio"]) == pytest.approx(float(base["step_ms"]) / float(r["step_ms"]))


def test_json_and_printed_table(bench_run):
    _, stdout, data = bench_run
    assert data["meta"]["world_size"] == 2 and data["meta"].get("deepspeed_error") is None
    for r in data["results"]:  # the summary is what the recorded trials give
        t = r["trial_s"]
        assert len(t) == 2 and all(s > 0 for s in t)
        assert r["step_ms"] == pytest.approx(statistics.median(t) * 1e3, rel=1e-12)
        assert (r["step_ms_min"], r["step_ms_max"]) == pytest.approx((min(t) * 1e3, max(t) * 1e3), rel=1e-12)
    assert "# MoE layer fwd+bwd, 2 ranks" in stdout and "# DecoderLM training steps (native engine)" in stdout
    assert "ringtrain[ring]" in stdout and "wrote" in stdout
    if HAS_DEEPSPEED:
        ds = next(r for r in data["results"] if r["impl"] == "deepspeed")
        assert data["meta"]["deepspeed"] and ds["ratio"] == 1.0


@pytest.mark.parametrize("argv,key", [(["--experts", "3"], "--experts"), (["--top-k", "2", "--experts", "2"], None),
                                      (["--top-k", "2", "--experts", "1"], "--top-k"),
                                      (["--algorithms", "tree"], "--algorithms"), (["--batch", "0"], "--batch")])
def test_bad_args_name_the_flag(argv, key, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    if key is None:
        assert parse_args(argv).top_k == 2
        return
    with pytest.raises(SystemExit):
        parse_args(argv)
    assert key in capsys.readouterr().err
