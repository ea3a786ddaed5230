"""The DDP benchmark end to end on 2 ranks (tiny model): its files, its rows, and that ringtrain's
DDP and torch's DDP take the same steps."""

from __future__ import annotations

import statistics

import pytest

from bench_files import SHORT, TINY, TINY_TOKENS, check_outputs, launch
from trainer.bench.ddp import COLUMNS, PEER, parse_args

ENGINES = ["ringtrain[ring]", "ringtrain[native]", PEER]


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    return launch(tmp_path_factory, "ddp", ["--algorithms", "ring,native", *TINY, *SHORT], nproc=2)


def test_writes_the_output_convention(bench_run):
    out, stdout, _ = bench_run
    rows, data = check_outputs(out, "ddp", stdout, COLUMNS)
    assert [r["engine"] for r in rows] == ENGINES and all(r["world_size"] == "2" for r in rows)
    assert data["meta"]["world_size"] == 2 and stdout.count("# DDP training throughput: 2 ranks") == 1


def test_rows_summarise_their_trials(bench_run):
    rows = {r["engine"]: r for r in bench_run[2]["results"]}
    for r in rows.values():
        t = r["trial_s"]
        assert len(t) == r["trials"] == 2 and all(s > 0 for s in t) and r["steps"] == 4  # 2 x (1 warm-up + 1)
        assert (r["tokens_per_s"], r["step_ms_min"], r["step_ms_max"]) == \
            (2 * TINY_TOKENS / statistics.median(t), min(t) * 1e3, max(t) * 1e3)
        assert r["ratio"] == pytest.approx(statistics.median(rows[PEER]["trial_s"]) / statistics.median(t))


def test_ringtrain_and_torch_ddp_take_the_same_steps(bench_run):
    # the same weights, batches, AdamW, clipping and averaged gradients: after the same 4 steps every
    # algorithm holds torch DDP's weights to float32 rounding, far below how far the steps moved them;
    # the last step's gradient norms (before clipping) agree too, which Adam's scale invariance would hide
    data = bench_run[2]
    moved = data["meta"]["max_weight_change"]
    assert moved > 1e-3, moved  # 4 AdamW steps at lr 1e-3 move weights by about lr each: the check has teeth
    rows = {r["engine"]: r for r in data["results"]}
    for name in ENGINES[:2]:
        r = rows[name]
        assert r["max_weight_diff"] <= 1e-5 * moved, (name, r["max_weight_diff"], moved)
        assert r["grad_norm"] == pytest.approx(rows[PEER]["grad_norm"], rel=1e-5), name
        assert (r["first_loss"], r["last_loss"]) == pytest.approx((rows[PEER]["first_loss"], rows[PEER]["last_loss"]),
                                                                  rel=1e-6), name
    assert rows[PEER]["last_loss"] < rows[PEER]["first_loss"] - 0.05  # it trained


def test_bad_algorithm_names_the_flag(capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(["--algorithms", "ring,butterfly"])
    assert exc.value.code == 2 and "--algorithms" in capsys.readouterr().err
