"""The alpha-beta-gamma cost model (parallel/bench/costmodel/): features against hand-worked
schedules, the fit on synthetic measurements, refusals, the CLI and the paper table. No
process groups: everything here is arithmetic on numbers."""

from __future__ import annotations

import csv
import itertools
import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from parallel.bench import costmodel as cm
from parallel.bench.costmodel import CostModel, Features, Measurement, Undetermined, features

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MiB = 1 << 20
TRUE = np.array([30e-6, 120e-6, 1 / 1.5e9, 1 / 0.1e9, 1 / 3e9])  # alpha_i, alpha_e, beta_i, beta_e, gamma
SIZES = [1 << k for k in range(10, 27)]
COLUMNS = ["op", "algorithm", "world_size", "nodes", "ranks_per_node", "dtype", "size_bytes", "count",
           "time_us", "algbw_gbps", "busbw_gbps", "wrong"]


def approx_features(got: Features, want, rel=1e-12):
    assert tuple(got) == pytest.approx(tuple(want), rel=rel, abs=1e-9), (got, want)


def synthetic(alg, op, layouts, sizes=SIZES, noise=0.0, seed=0, theta=TRUE) -> list[Measurement]:
    rng = np.random.default_rng(seed)
    out = []
    for N, P in layouts:
        for n in sizes:
            t = float(theta @ features(op, alg, n, N, P).as_array())
            out.append(Measurement(op, alg, N, P, n, t * math.exp(rng.normal(0, noise)) if noise else t))
    return out


def write_csv(path, measurements, layout_columns=True):
    cols = COLUMNS if layout_columns else [c for c in COLUMNS if c not in ("nodes", "ranks_per_node")]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for m in measurements:
            d = {"op": m.op, "algorithm": m.algorithm, "world_size": m.world_size, "nodes": m.nodes,
                 "ranks_per_node": m.ranks_per_node, "dtype": "float32", "size_bytes": m.size_bytes,
                 "count": m.size_bytes // 4, "time_us": f"{m.seconds * 1e6:.4f}", "algbw_gbps": "0",
                 "busbw_gbps": "0", "wrong": "0"}
            w.writerow([d[c] for c in cols])
    return str(path)


# -- features -------------------------------------------------------------------------------

def test_ring_and_hier_on_2x2_by_hand():
    n = 64 * MiB
    # flat ring over ranks 0 1 | 2 3: 6 steps of n/4, each crossing both links once per direction
    approx_features(features("all_reduce", "ring", n, 2, 2), (0, 6, 0, 6 * n / 4, 3 * n / 4))
    # hier: ring RS over 2 (1 step of n/2), 2 inter rings of n/2 at once (2 steps of n/4, 2 flows
    # per link), ring AG over 2
    approx_features(features("all_reduce", "hier", n, 2, 2), (2, 2, n, 2 * 2 * n / 4, 3 * n / 4))
    ratio = features("all_reduce", "ring", n, 2, 2).b_inter / features("all_reduce", "hier", n, 2, 2).b_inter
    assert ratio == pytest.approx(1.5)
    approx_features(features("reduce_scatter", "hier", n, 2, 2), (1, 1, n / 2, n / 2, 3 * n / 4))
    approx_features(features("all_gather", "hier", n, 4, 2), (1, 3, n / 2, 3 * 2 * n / 8, 0))


@pytest.mark.parametrize("op", ["all_reduce", "reduce_scatter", "all_gather"])
@pytest.mark.parametrize("layout", [(1, 2), (1, 5), (3, 1), (6, 1)])
def test_hier_without_two_levels_is_the_flat_ring(op, layout):
    for n in (1024, 48 * 1024, 8 * MiB):
        assert features(op, "hier", n, *layout) == features(op, "ring", n, *layout)


def test_hier_on_two_levels_differs_from_ring():
    assert features("all_reduce", "hier", 8 * MiB, 2, 2) != features("all_reduce", "ring", 8 * MiB, 2, 2)


def _ring_by_steps(N, P, n, phases, reduces):
    """The ring's schedule as explicit steps (r -> r+1 for every r), charged by the generic rule."""
    p, acc = N * P, cm._Acc()
    for _ in range(phases * (p - 1)):
        acc.charge([(r, (r + 1) % p) for r in range(p)], n / p, P, 1)
    return acc.features()._replace(g=(p - 1) * n / p if reduces else 0.0)


@pytest.mark.parametrize("layout", [(1, 3), (2, 2), (3, 2), (2, 3), (4, 1)])
def test_ring_closed_form_matches_its_step_by_step_accounting(layout):
    n = 3 * MiB
    approx_features(features("all_reduce", "ring", n, *layout), _ring_by_steps(*layout, n, 2, True))
    approx_features(features("reduce_scatter", "ring", n, *layout), _ring_by_steps(*layout, n, 1, True))
    approx_features(features("all_gather", "ring", n, *layout), _ring_by_steps(*layout, n, 1, False))


def test_rhd_by_hand():
    n = 64 * MiB
    # 2 x 2: mask 2 crosses nodes (ranks 0,1 -> node 1: 2 flows per link, n/2 each), mask 1 stays in
    approx_features(features("all_reduce", "rhd", n, 2, 2), (2, 2, 2 * n / 4, 2 * 2 * n / 2, 3 * n / 4))
    # 3 ranks: fold 0 -> 1 (n), halving and doubling between 1 and 2 (n/2 each), unfold 1 -> 0 (n)
    approx_features(features("all_reduce", "rhd", n, 1, 3), (4, 0, 3 * n, 0, n + n / 2))
    approx_features(features("all_reduce", "rhd", n, 3, 1), (0, 4, 0, 3 * n, n + n / 2))
    # powers of two: the docstring's closed form
    N, P = 4, 4
    approx_features(features("all_reduce", "rhd", n, N, P),
                    (2 * 2, 2 * 2, 2 * (P - 1) * n / (N * P), 2 * P * (N - 1) * n / N, (N * P - 1) * n / (N * P)))


def test_tree_all_reduce_by_hand_and_half_types_travel_as_float32():
    n = 64 * MiB
    approx_features(features("all_reduce", "tree", n, 2, 2), (1, 1, n, 2 * n, 2 * n))
    approx_features(features("all_reduce", "tree", n, 2, 2, dtype="bfloat16"), (1, 1, 2 * n, 4 * n, 4 * n))
    # 5 ranks: fold in, 2 doubling rounds, fold out; all on one node
    approx_features(features("all_reduce", "tree", n, 1, 5), (4, 0, 4 * n, 0, 3 * n))


def test_all_to_all_and_broadcast_by_hand():
    n = 64 * MiB
    approx_features(features("all_to_all", "ring", n, 2, 2), (1, 2, 0, 4 * n / 4, 0))
    approx_features(features("all_to_all", "native", n, 1, 4), (3, 0, 3 * n / 4, 0, 0))
    # chain 0 -> 1 | 2 -> 3, one segment: hops intra, inter, intra
    approx_features(features("broadcast", "ring", 4096, 2, 2), (2, 1, 2 * 4096, 4096, 0))
    # 16 segments of 4 MiB: 18 stages, of which the 16 with hop 1 active are inter-node
    approx_features(features("broadcast", "ring", n, 2, 2), (2, 16, 2 * n / 16, 16 * n / 16, 0))
    # binomial tree on 4 x 2: 0 => {1, 2, 4} (2 of them off node 0), 4 => {5, 6}, 6 => 7
    approx_features(features("broadcast", "tree", n, 4, 2), (1, 2, n, 2 * n + n, 0))


def test_segment_count_is_the_pipelines():
    from parallel.collectives.pipeline import segment_count
    from parallel.collectives.registry import Tuning

    for nbytes in [1, 4, 1000, 64 << 10, (128 << 10) - 4, 128 << 10, 4 * MiB, 4 * MiB + 4, 63 * MiB, 1 << 30]:
        assert cm.segment_count(nbytes, 4) == segment_count(max(nbytes // 4, 1), 4, Tuning()), nbytes


def test_hier_switches_to_rhd_between_nodes_for_small_pieces_as_hier_does():
    from parallel.collectives import hier

    assert cm.HIER_SMALL_PIECE_BYTES == hier.SMALL_PIECE_BYTES
    N, P = 4, 2
    small = features("all_reduce", "hier", P * (cm.HIER_SMALL_PIECE_BYTES - 1024), N, P)
    large = features("all_reduce", "hier", P * cm.HIER_SMALL_PIECE_BYTES, N, P)
    assert small.a_inter == 2 * math.log2(N) and large.a_inter == 2 * (N - 1)


def test_flows_sharing_a_link_and_links_per_node():
    n = 1 << 30
    one = features("all_reduce", "hier", n, 2, 8, nics=1)
    eight = features("all_reduce", "hier", n, 2, 8, nics=8)
    assert one.b_inter == pytest.approx(8 * eight.b_inter)  # 8 flows on one link, or one per NIC
    assert features("all_reduce", "ring", n, 2, 8, nics=8) == features("all_reduce", "ring", n, 2, 8, nics=1)


def test_features_refuse_what_they_do_not_model():
    with pytest.raises(ValueError, match="op must be one of"):
        features("all_reduce_x", "ring", 8, 1, 2)
    with pytest.raises(ValueError, match="no model for hier broadcast"):
        features("broadcast", "hier", 8, 2, 2)
    with pytest.raises(ValueError, match="auto has no features"):
        features("all_reduce", "auto", 8, 2, 2)
    with pytest.raises(ValueError, match="nodes must be"):
        features("all_reduce", "ring", 8, 0, 2)
    assert features("all_reduce", "ring", 8, 1, 1) == Features()


# -- fitting --------------------------------------------------------------------------------

def _brute_nnls(A, b):
    best, arg = np.linalg.norm(b), np.zeros(A.shape[1])
    for k in range(1, A.shape[1] + 1):
        for S in itertools.combinations(range(A.shape[1]), k):
            z = np.zeros(A.shape[1])
            z[list(S)] = np.linalg.lstsq(A[:, list(S)], b, rcond=None)[0]
            r = np.linalg.norm(A @ z - b)
            if (z >= -1e-12).all() and r < best - 1e-12:
                best, arg = r, z
    return arg


def test_nnls_finds_the_constrained_optimum():
    rng = np.random.default_rng(3)
    for _ in range(200):
        A = rng.normal(size=(rng.integers(3, 15), rng.integers(1, 6)))
        b = rng.normal(size=A.shape[0])
        x = cm.nnls(A, b)
        assert (x >= 0).all()
        best = np.linalg.norm(A @ _brute_nnls(A, b) - b)
        assert np.linalg.norm(A @ x - b) == pytest.approx(best, rel=1e-9, abs=1e-12)


FIT_LAYOUTS = [(1, 2), (1, 3), (1, 4), (1, 5), (2, 2), (2, 3), (2, 4)]  # one and two nodes


def test_fit_recovers_known_parameters_and_predicts_more_nodes():
    # tree all-reduce over layouts with and without the fold: all five parameters identifiable
    # (its reduced bytes per byte moved differ between them, unlike the ring's)
    model = CostModel.fit(synthetic("tree", "all_reduce", FIT_LAYOUTS, noise=0.005, seed=1))
    fit = model.fits[("tree", "all_reduce")]
    assert fit.status == ["fitted"] * 5
    assert fit.params == pytest.approx(TRUE, rel=0.05)
    for N, P in [(4, 2), (4, 3), (8, 2)]:  # more nodes than any fitting row
        for n in SIZES:
            want = float(TRUE @ features("all_reduce", "tree", n, N, P).as_array())
            assert model.predict("all_reduce", "tree", n, N, P) == pytest.approx(want, rel=0.02)


def test_ring_gamma_is_confounded_and_the_betas_carry_it():
    model = CostModel.fit(synthetic("ring", "all_reduce", [(1, 2), (1, 4), (2, 2), (2, 4)], noise=0.005))
    fit = model.fits[("ring", "all_reduce")]
    assert fit.status == ["fitted"] * 4 + ["confounded"]
    assert set(fit.confounded_with["gamma"]) == {"beta_intra", "beta_inter"}
    # ring all-reduce moves 2 bytes per byte it reduces: each beta carries gamma / 2
    assert fit.params[:4] == pytest.approx([TRUE[0], TRUE[1], TRUE[2] + TRUE[4] / 2, TRUE[3] + TRUE[4] / 2], rel=0.03)
    assert fit.params[4] == 0
    for n in SIZES:
        want = float(TRUE @ features("all_reduce", "ring", n, 8, 2).as_array())
        assert model.predict("all_reduce", "ring", n, 8, 2) == pytest.approx(want, rel=0.02)


def test_hier_fit_on_one_and_two_nodes_predicts_four():
    model = CostModel.fit(synthetic("hier", "all_reduce", [(1, 2), (2, 2)], noise=0.005, seed=4))
    for n in SIZES:
        want = float(TRUE @ features("all_reduce", "hier", n, 4, 2).as_array())
        assert model.predict("all_reduce", "hier", n, 4, 2) == pytest.approx(want, rel=0.03)


def test_undetermined_parameters_are_refused_not_zero(tmp_path):
    model = CostModel.fit(synthetic("ring", "all_reduce", [(1, 2), (1, 4)]))
    fit = model.fits[("ring", "all_reduce")]
    assert fit.status[1] == fit.status[3] == "undetermined"
    assert math.isnan(fit.params[1]) and math.isnan(fit.params[3])
    assert model.predict("all_reduce", "ring", MiB, 1, 8) == pytest.approx(
        float(TRUE @ features("all_reduce", "ring", MiB, 1, 8).as_array()), rel=1e-6)
    with pytest.raises(Undetermined, match=r"alpha_inter, beta_inter.*layouts 1x2, 1x4"):
        model.predict("all_reduce", "ring", MiB, 2, 2)
    with pytest.raises(Undetermined, match="no fit for hier all_reduce"):
        model.predict("all_reduce", "hier", MiB, 2, 2)
    model.save(tmp_path / "p.json")
    saved = json.loads((tmp_path / "p.json").read_text())["models"][0]
    assert saved["params"]["alpha_inter"] is None and saved["status"]["beta_inter"] == "undetermined"
    assert saved["layouts"] == {"1x2": len(SIZES), "1x4": len(SIZES)} and saved["rows"] == 2 * len(SIZES)
    with pytest.raises(Undetermined):
        CostModel.load(tmp_path / "p.json").predict("all_reduce", "ring", MiB, 2, 2)


def test_save_and_load_give_the_same_predictions(tmp_path):
    rows = synthetic("hier", "all_reduce", [(1, 2), (2, 2), (2, 4)]) + synthetic("rhd", "all_reduce", [(1, 3), (2, 2)])
    model = CostModel.fit(rows)
    model.save(tmp_path / "p.json")
    again = CostModel.load(tmp_path / "p.json")
    for alg, (N, P), n in itertools.product(["hier", "rhd"], [(2, 2), (4, 2)], [4096, 16 * MiB]):
        assert again.predict("all_reduce", alg, n, N, P) == model.predict("all_reduce", alg, n, N, P)
    (tmp_path / "bad.json").write_text('{"format": "something else"}')
    with pytest.raises(ValueError, match="bad.json"):
        CostModel.load(tmp_path / "bad.json")


def test_auto_is_the_fastest_of_the_others():
    rows = synthetic("ring", "all_reduce", [(1, 2), (2, 2)]) + synthetic("tree", "all_reduce", [(1, 2), (2, 2)])
    model = CostModel.fit(rows + [Measurement("all_reduce", "auto", 2, 2, 1024, 1.0)])  # auto rows are not fitted
    assert ("auto", "all_reduce") not in model.fits
    for n in (1024, 64 * MiB):
        others = [model.predict("all_reduce", a, n, 4, 2) for a in ("ring", "tree")]
        assert model.predict("all_reduce", "auto", n, 4, 2) == min(others)
    assert model.predict("all_reduce", "auto", 1024, 4, 2) < model.predict("all_reduce", "auto", 64 * MiB, 4, 2)
    with pytest.raises(Undetermined, match="auto broadcast"):
        model.predict("broadcast", "auto", 1024, 4, 2)


def test_reading_results_csv(tmp_path):
    ms = synthetic("ring", "all_reduce", [(1, 4)], sizes=[1024])
    old = write_csv(tmp_path / "old.csv", ms, layout_columns=False)
    rows, _ = cm.read_results(old)
    assert [(r.nodes, r.ranks_per_node) for r in rows] == [(1, 4)]
    new = tmp_path / "new.csv"
    new.write_text(",".join(COLUMNS) + "\n"
                   "all_reduce,ring,4,2,2,float32,1024,256,10.0,0,0,0\n"
                   "all_reduce,ring,4,2,,float32,1024,256,10.0,0,0,0\n"  # uneven layout: left out
                   "all_reduce,ring,4,2,2,float32,2048,512,10.0,0,0,3\n")  # a wrong result: left out
    rows, notes = cm.read_results(new)
    assert [(r.nodes, r.ranks_per_node, r.size_bytes) for r in rows] == [(2, 2, 1024)]
    assert any("uneven" in n for n in notes) and any("wrong" in n for n in notes)


# -- the CLI --------------------------------------------------------------------------------

def _fit_files(tmp_path):
    algs = [("ring", "all_reduce"), ("hier", "all_reduce"), ("ring", "all_gather")]
    one = sum((synthetic(a, o, [(1, 4)], noise=0.01, seed=2) for a, o in algs), [])
    two = sum((synthetic(a, o, [(1, 2), (2, 2), (2, 4)], noise=0.01, seed=3) for a, o in algs), [])
    check = sum((synthetic(a, o, [(4, 2)], sizes=SIZES[::3], noise=0.01, seed=5) for a, o in algs), [])
    return (write_csv(tmp_path / "one.csv", one, layout_columns=False), write_csv(tmp_path / "two.csv", two),
            write_csv(tmp_path / "check.csv", check), len(check))


LAST = re.compile(r"^median abs error (\d+\.\d)% over (\d+) rows$")


def test_cli_fits_checks_saves_and_reloads(tmp_path, capsys):
    one, two, check, nrows = _fit_files(tmp_path)
    params = str(tmp_path / "params.json")
    assert cm.main(["--fit", one, two, "--check", check, "--save", params]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    m = LAST.match(lines[-1])
    assert m, lines[-1]
    assert int(m.group(2)) == nrows and float(m.group(1)) < 3.0
    assert lines[-2].startswith("# worst: ")
    data = [ln for ln in lines if re.match(r"^\s+(all_reduce|all_gather)\s+(ring|hier)\s+4x2\s", ln)]
    assert len(data) == nrows
    saved = json.loads(open(params).read())
    assert {(d["algorithm"], d["op"]) for d in saved["models"]} == {("ring", "all_reduce"), ("hier", "all_reduce"),
                                                                  ("ring", "all_gather")}
    assert cm.main(["--params", params, "--check", check, "--ops", "all_reduce", "--min-bytes", "64K"]) == 0
    again = capsys.readouterr().out.strip().splitlines()
    kept = [ms for ms in cm.read_results(check)[0] if ms.op == "all_reduce" and ms.size_bytes >= 64 << 10]
    assert LAST.match(again[-1]) and int(LAST.match(again[-1]).group(2)) == len(kept)


def test_cli_refuses_layouts_the_fit_cannot_answer(tmp_path, capsys):
    one, _, check, _ = _fit_files(tmp_path)
    assert cm.main(["--fit", one, "--check", check]) == 1  # nothing predictable: every check row is on 4 nodes
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1] == "median abs error nan% over 0 rows"
    assert any(ln.startswith("# refused") and "alpha_inter" in ln for ln in out)


def test_cli_missing_file_is_one_line_exit_2_naming_it(tmp_path):
    missing = str(tmp_path / "nope" / "results.csv")
    proc = subprocess.run([sys.executable, "-m", "parallel.bench.costmodel", "--fit", missing], cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "--fit" in err[0] and missing in err[0], proc.stderr


@pytest.mark.parametrize("case, needle", [
    ("columns", "missing column(s) world_size, size_bytes, time_us"),
    ("csv_op", "unknown op 'all_reduce_x'"),
    ("ops_flag", "--ops: unknown op 'scatter'"),
    ("params", "--params"),
    ("check_missing", "--check"),
])
def test_cli_bad_input_exit_2(tmp_path, capsys, case, needle):
    one, _, check, _ = _fit_files(tmp_path)
    bad = tmp_path / "bad.csv"
    if case == "columns":
        bad.write_text("op,algorithm\nall_reduce,ring\n")
        argv = ["--fit", str(bad)]
    elif case == "csv_op":
        bad.write_text(",".join(COLUMNS) + "\nall_reduce_x,ring,4,1,4,float32,8,2,1.0,0,0,0\n")
        argv = ["--fit", str(bad)]
    elif case == "ops_flag":
        argv = ["--fit", one, "--ops", "all_reduce,scatter"]
    elif case == "params":
        bad.write_text("not json")
        argv = ["--params", str(bad), "--check", check]
    else:
        argv = ["--fit", one, "--check", str(tmp_path / "absent.csv")]
    assert cm.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
    if case in ("columns", "csv_op"):
        assert str(bad) in err[0]


def test_paper_table_rows_and_figures(capsys):
    assert cm.main(["--paper"]) == 0
    out = capsys.readouterr().out
    rows = [ln for ln in out.splitlines() if re.match(r"^\| \d+ \|", ln)]
    cells = [[c.strip() for c in ln.strip("|").split("|")] for ln in rows]
    assert [int(c[0]) for c in cells] == [1, 2, 4, 16, 64]
    assert [int(c[1]) for c in cells] == [8, 16, 32, 128, 512]
    ring = {int(c[0]): float(c[2]) for c in cells}
    hier = {int(c[0]): float(c[3]) for c in cells}
    assert ring[1] == hier[1] == pytest.approx(370, rel=0.01)  # one node: NVLink's ring busbw
    assert all(44 < ring[N] <= 48 for N in (2, 4, 16, 64))  # one flow per link direction: one NIC's worth
    # hier, bandwidth terms only: busbw = 2(p-1)/p / (2(P-1)/P / 370 + 2(N-1)/N / 384)
    assert hier[2] == pytest.approx((30 / 16) / (1.75 / 370 + 1.0 / 384), rel=0.005)
    assert hier[2] > hier[4] > hier[16] > hier[64] > ring[2]
    assert "~470" in rows[1] and "~366" in rows[2]


def test_layout_from_results_json_beside_a_csv_without_layout_columns(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    write_csv(run / "results.csv", synthetic("ring", "all_reduce", [(2, 2)], sizes=[1024, 4096]), layout_columns=False)
    (run / "results.json").write_text(json.dumps({"meta": {"world_size": 4, "nodes": 2, "ranks_per_node": 2}}))
    rows, notes = cm.read_results(run / "results.csv")
    assert {(r.nodes, r.ranks_per_node) for r in rows} == {(2, 2)} and any("results.json" in n for n in notes)
    (run / "results.json").write_text(json.dumps({"meta": {"world_size": 4, "nodes": 2, "ranks_per_node": None}}))
    rows, notes = cm.read_results(run / "results.csv")
    assert rows == [] and any("uneven" in n for n in notes)
