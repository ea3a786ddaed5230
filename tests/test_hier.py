"""Hierarchical collectives on node layouts emulated inside one pool of gloo ranks (each
rank is told its node), `auto`'s choices from a tuning table, and node discovery.
The emulated multi-node cluster (network namespaces) runs them for real in
test_emulated_cluster.py."""

from __future__ import annotations

import json

import pytest

from parallel.collectives import NodeLayout, TuningTable, split_bounds
from parallel.collectives.hier import SMALL_PIECE_BYTES
from test_collectives import FLOATS, INTS, check, reference, sizes_for

LAYOUTS = {
    4: [(0, 0, 1, 1), (0, 1, 0, 1), (0, 1, 1, 0)],   # 2 x 2: node-major, round-robin, nested
    6: [(0, 0, 1, 1, 2, 2), (0, 0, 0, 1, 1, 1)],    # 3 x 2 and 2 x 3
    3: [(0, 1, 2)],                                 # 3 x 1: flat over nodes
    5: [(0, 0, 0, 0, 0)],                           # 1 x 5: flat on one node
}


def layout_specs(p: int) -> list[dict]:
    specs, seed = [], 1000 * p
    for layout in LAYOUTS[p]:
        for op in ("all_reduce", "reduce_scatter", "all_gather"):
            for dtype in FLOATS + INTS:
                for rop in (["sum", "avg", "max", "min"] if op != "all_gather" else ["sum"]):
                    if rop == "avg" and dtype in INTS:
                        continue
                    for n in sizes_for(p):
                        seed += 1
                        specs.append({"op": op, "algorithm": "hier", "dtype": dtype, "n": n, "seed": seed,
                                      "reduce_op": rop, "layout": layout, "noncontig": seed % 3 == 0,
                                      "tuning": (256, 2, 0) if seed % 2 else (4 << 20, 2, 64 << 10)})
    return specs


@pytest.mark.parametrize("p", sorted(LAYOUTS))
def test_hier_exact_on_every_layout_dtype_and_size(pools, p):
    check(pools(p), layout_specs(p))


def test_hier_large_buffer_pipelined(pools):
    # several segments per piece at both levels, avg over 2 x 2
    specs = [{"op": op, "algorithm": "hier", "dtype": "float32", "n": 300_001, "seed": 3, "reduce_op": "avg",
              "layout": (0, 0, 1, 1), "tuning": (64 << 10, 3, 1 << 10)}
             for op in ("all_reduce", "reduce_scatter", "all_gather")]
    check(pools(4), specs)


def _ring_sends(op: str, n: int, p: int, r: int) -> int:
    from test_collectives import _ring_elements
    return _ring_elements(op, n, p, r)


@pytest.mark.parametrize("layout", [(0, 0, 1, 1), (0, 0, 1, 1, 2, 2)])
@pytest.mark.parametrize("op", ["all_reduce", "reduce_scatter", "all_gather"])
def test_inter_node_bytes_hier_against_ring(pools, layout, op):
    """Exact bytes crossing nodes per rank: a flat ring crosses where its next rank is on
    another node; hier only in its inter-node phase, among the ranks of one local index."""
    p, n = len(layout), 120_007
    lay = NodeLayout(layout)
    nodes, per = lay.nodes, lay.ranks_per_node
    hier = pools(p).run("dist_cases:inter_node_bytes", node_of=list(layout), algorithm="hier", op=op, n=n)
    ring = pools(p).run("dist_cases:inter_node_bytes", node_of=list(layout), algorithm="ring", op=op, n=n)
    b = split_bounds(n, p)
    for r in range(p):
        crosses = layout[(r + 1) % p] != layout[r]
        assert ring[r]["inter_node_bytes"] == (4 * _ring_sends(op, n, p, r) if crosses else 0), r
        local, node = lay.local_index(r), layout[r]
        if op == "all_reduce":
            piece = split_bounds(n, per)
            length = piece[local + 1] - piece[local]
            assert length * 4 >= SMALL_PIECE_BYTES  # the ring between nodes
            expected = _ring_sends("all_reduce", length, nodes, node)
        else:  # the pieces of this local index's ranks, one per node
            peers = lay.peers(local)
            sizes = [b[q + 1] - b[q] for q in peers]
            inner = [0]
            for s in sizes:
                inner.append(inner[-1] + s)
            me = peers.index(r)
            if op == "reduce_scatter":
                expected = sum(sizes[c] for c in range(nodes) if c != me)
            else:
                expected = sum(sizes[c] for c in range(nodes) if me != (c - 1) % nodes)
        assert hier[r]["inter_node_bytes"] == 4 * expected, r
    # what each node's one link carries: the ratio that bounds hier's speed-up
    per_node = lambda res: [sum(res[r]["inter_node_bytes"] for r in lay.members(k)) for k in range(nodes)]  # noqa: E731
    ratio = max(per_node(ring)) / max(per_node(hier))
    bound = ((p - 1) / p) / ((nodes - 1) / nodes)
    assert ratio == pytest.approx(bound, rel=1e-3)


def test_hier_refused_on_uneven_layout(pools):
    msgs = pools(3).run("dist_cases:hier_refusals")[0]
    assert "node 0 has ranks 0-1; node 1 has rank 2" in msgs["communicator"]
    assert "parallel.algorithm=hier" in msgs["topology"] and "node 1 has rank 2" in msgs["topology"]


def test_node_discovery(pools):
    got = pools(4).run("dist_cases:discovered_layout", node_env=["b", "a", "b", "a"], group_rank=None)
    assert all(g == [0, 1, 0, 1] for g in got)
    got = pools(4).run("dist_cases:discovered_layout", node_env=None, group_rank=["0", "0", "1", "1"])
    assert all(g == [0, 0, 1, 1] for g in got)
    got = pools(2).run("dist_cases:discovered_layout", node_env=None, group_rank=None)  # one host
    assert all(g == [0, 0] for g in got)


# -- auto -----------------------------------------------------------------

def tuning_json(world: int, nodes: int = 1, per_node: int | None = None, entries=None) -> dict:
    entries = entries if entries is not None else [
        {"op": "all_reduce", "dtype": "float32", "size_bytes": 1 << 10,
         "seconds": {"ring": 3e-4, "rhd": 1e-4, "tree": 2e-4, "native": 5e-4}},
        {"op": "all_reduce", "dtype": "float32", "size_bytes": 1 << 20,
         "seconds": {"ring": 3e-3, "rhd": 4e-3, "tree": 2e-3, "native": 5e-3}},
        {"op": "all_reduce", "dtype": "float32", "size_bytes": 16 << 20,
         "seconds": {"ring": 3e-2, "rhd": 4e-2, "tree": 5e-2, "native": 1e-2}},
    ]
    return {"format": "ringtrain-tuning/1", "world_size": world, "nodes": nodes,
            "ranks_per_node": per_node or world // nodes, "backend": "gloo", "source": "test", "entries": entries}


def test_auto_runs_what_the_tuning_table_says(pools):
    # 256 elements (1 KiB) -> rhd; 200K (800 KB, nearest 1 MiB) -> tree; 3M (12 MB, nearest 16 MiB) -> native;
    # float64 was not measured: its bytes pick (2K elements = 16 KiB, nearest 1 KiB) -> rhd
    sizes = [256, 200_000, 3_000_000]
    got = pools(3).run("dist_cases:auto_choices", table=tuning_json(3), sizes=sizes, dtype="float32")
    for r in range(3):
        assert got[r]["named"] == ["rhd", "tree", "native"]
        assert got[r]["ran"] == ["rhd", "tree", "native"]
    for i, n in enumerate(sizes):
        expected = reference({"op": "all_reduce", "n": n, "seed": 50 + i, "dtype": "float32"}, 3)
        for r in range(3):
            assert got[r]["results"][i].double().sub(expected[r]).abs().max() < 1e-4
    got = pools(3).run("dist_cases:auto_choices", table=tuning_json(3), sizes=[2048], dtype="float64")
    assert got[0]["named"] == ["rhd"]


def test_tuning_file_damaged_or_for_another_layout(tmp_path):
    path = tmp_path / "tuning.json"
    cases = {
        "not json {": "not a readable JSON tuning file",
        json.dumps({"format": "other"}): "not a ringtrain tuning file",
        json.dumps({k: v for k, v in tuning_json(2).items() if k != "entries"}): "damaged",
        json.dumps(tuning_json(2, entries=[{"op": "all_reduce", "dtype": "float32", "size_bytes": 8,
                                            "seconds": {"warp": 1.0}}])): "algorithm 'warp'",
        json.dumps(tuning_json(2, entries=[{"op": "all_reduce", "dtype": "float32", "size_bytes": 8,
                                            "seconds": {"ring": -1.0}}])): "with time -1.0",
    }
    for text, why in cases.items():
        path.write_text(text)
        with pytest.raises(ValueError, match=rf"^parallel\.tuning={path}: .*{why}"):
            TuningTable.load(path)
    with pytest.raises(ValueError, match="no such file"):
        TuningTable.load(tmp_path / "missing.json")
    path.write_text(json.dumps(tuning_json(4, nodes=2)))
    table = TuningTable.load(path)
    assert table.mismatch(world_size=4, layout=NodeLayout.regular(2, 2), backend="gloo") is None
    why = table.mismatch(world_size=4, layout=NodeLayout.single(4), backend="gloo")
    assert why == "it was measured for 4 ranks as 2 x 2 on gloo, this job is 4 ranks as 1 x 4 on gloo"
    assert table.mismatch(world_size=4, layout=NodeLayout.regular(2, 2), backend="nccl") is not None


def test_tuning_table_predicts_between_measured_sizes():
    t = TuningTable(world_size=2, nodes=1, ranks_per_node=2, backend="gloo", source="test",
                    entries=[])
    from parallel.collectives.autotune import Entry
    t.entries = [Entry("all_reduce", "float32", 1000, {"ring": 1.0}), Entry("all_reduce", "float32", 3000, {"ring": 5.0})]
    assert t.predict_s("all_reduce", "float32", 2000, "ring") == pytest.approx(3.0)
    assert t.predict_s("all_reduce", "float32", 10, "ring") == 1.0        # below: latency-bound
    assert t.predict_s("all_reduce", "float32", 6000, "ring") == pytest.approx(10.0)  # above: by size
    assert t.predict_s("all_reduce", "float32", 2000, "tree") is None


# -- auto in training -------------------------------------------------------

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]
TINY = ["model=tiny", "trainer.micro_batch_size=4", "trainer.progress=false", "trainer.max_steps=2",
        "trainer.eval_every=0", "trainer.eval_batches=1", "parallel.bucket_mb=0.05", "parallel.first_bucket_mb=0.002"]


def _train(args, run_dir, n=2):
    import os
    import subprocess
    import sys
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
           "-m", "trainer.train", *TINY, *args, f"hydra.run.dir={run_dir}"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-4000:]
    return r


def test_training_with_auto_takes_each_buckets_algorithm_from_the_tuning_file(tmp_path):
    entries = [{"op": "all_reduce", "dtype": "float32", "size_bytes": size, "seconds": secs} for size, secs in [
        (512, {"ring": 3e-4, "rhd": 1e-4, "tree": 2e-4, "native": 5e-4}),
        (16 << 10, {"ring": 3e-3, "rhd": 4e-3, "tree": 2e-3, "native": 5e-3}),
        (64 << 10, {"ring": 1e-3, "rhd": 4e-3, "tree": 5e-3, "native": 2e-3})]]
    path = tmp_path / "tuning.json"
    path.write_text(json.dumps(tuning_json(2, entries=entries)))
    table = TuningTable.load(path)
    r = _train(["parallel.algorithm=auto", f"parallel.tuning={path}"], tmp_path / "run")
    record = json.loads((tmp_path / "run" / "collectives.json").read_text())
    assert record["algorithm"] == "auto" and record["tables"]["dp"] == str(path)
    buckets = record["buckets"]
    assert len(buckets) >= 3 and all(b["op"] == "all_reduce" and b["group"] == "dp" for b in buckets)
    for b in buckets:
        assert b["algorithm"] == table.choose("all_reduce", "float32", b["bytes"], ["ring", "rhd", "tree", "native"])
        assert b["predicted_ms"] == pytest.approx(
            1e3 * table.predict_s("all_reduce", "float32", b["bytes"], b["algorithm"]))
    assert len({b["algorithm"] for b in buckets}) >= 2, buckets  # the sizes straddle the table's choices
    for b in buckets:  # printed once at start, one line per bucket
        assert f"bucket {b['bucket']:3d}" in r.stderr + r.stdout
    assert not (tmp_path / "run" / "tuning.json").exists()  # nothing was calibrated


def test_training_with_a_tuning_file_for_another_layout_calibrates(tmp_path):
    path = tmp_path / "tuning.json"
    path.write_text(json.dumps(tuning_json(4, nodes=2)))
    r = _train(["parallel.algorithm=auto", f"parallel.tuning={path}", "parallel.calibration_s=2"], tmp_path / "run")
    out = r.stderr + r.stdout
    assert f"parallel.tuning={path} is not used: it was measured for 4 ranks as 2 x 2 on gloo, " \
           "this job is 2 ranks as 1 x 2 on gloo" in out
    record = json.loads((tmp_path / "run" / "collectives.json").read_text())
    assert record["tables"]["dp"].startswith("calibration at start-up")
    calibrated = TuningTable.load(tmp_path / "run" / "tuning.json")  # reusable as parallel.tuning
    assert (calibrated.world_size, calibrated.nodes, calibrated.ranks_per_node) == (2, 1, 2)
    for b in record["buckets"]:
        assert b["algorithm"] == calibrated.choose("all_reduce", "float32", b["bytes"], ["ring", "rhd", "tree", "native"])
        assert b["predicted_ms"] is not None and b["predicted_ms"] > 0
