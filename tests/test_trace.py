"""trainer.trace_steps: the traced steps' compute and collectives in a Chrome trace per rank and a
PNG on rank 0, nothing outside them, and the same training with or without tracing.

Launches are shared (module fixture `runs`): a 4-step DDP run tracing steps 2-3 with gradient
accumulation and small buckets, the same run without tracing, and a 2-step ZeRO-3 run tracing
step 2. The exposed communication share is checked on hand-made intervals."""

import json
import math
import os
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
from hydra import compose, initialize_config_dir

import trainer.train  # noqa: F401  registers the schema
from parallel.collectives import CollectiveSpan
from trainer.config import load_config
from trainer.structured import ConfigError
from trainer.trace import (NO_TRACE, StepTracer, collective_name, exposed_intervals, exposed_share, human_bytes,
                           subtract, union)

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model=tiny", "data=synthetic", "trainer.micro_batch_size=4", "trainer.progress=false",
        "optim.warmup_steps=2", "trainer.log_every=1", "trainer.eval_every=0", "trainer.eval_batches=1",
        "parallel.bucket_mb=0.05", "parallel.first_bucket_mb=0.05"]
DDP = TINY + ["trainer.max_steps=4", "trainer.grad_accum=2"]
TRACED = (2, 3)


def _launch(args, run_dir, n=2):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
           "-m", "trainer.train", *args, f"hydra.run.dir={run_dir}"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "WANDB_SILENT": "true"})
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    return run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("trace")
    return SimpleNamespace(
        traced=_launch(DDP + [f"trainer.trace_steps=[{TRACED[0]},{TRACED[1]}]"], root / "traced"),
        plain=_launch(DDP, root / "plain"),
        zero3=_launch(TINY + ["parallel=zero3", "trainer.max_steps=2", "trainer.trace_steps=[2,9]"], root / "zero3"),
    )


def _trace(run_dir, rank=0) -> dict:
    return json.loads((Path(run_dir) / "trace" / f"trace_rank{rank}.json").read_text())


def _threads(trace) -> dict[int, str]:
    return {e["tid"]: e["args"]["name"] for e in trace["traceEvents"] if e["ph"] == "M" and e["name"] == "thread_name"}


def _spans(trace, **match) -> list[dict]:
    return [e for e in trace["traceEvents"] if e["ph"] == "X" and all(e.get(k) == v for k, v in match.items())]


def _main_tid(trace) -> int:
    (tid,) = [t for t, name in _threads(trace).items() if name == "main"]
    return tid


def _metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


# -- pure: intervals, names, the tracer's hooks -------------------------------------------
def test_exposed_share_on_hand_made_intervals():
    step = (0.0, 10.0)
    # compute 0-4 and 6-8, one collective 3-7: exposed only 4-6
    assert exposed_intervals(step, [(0, 4), (6, 8)], [(3, 7)]) == [(4, 6)]
    assert exposed_share(step, [(0, 4), (6, 8)], [(3, 7)]) == pytest.approx(0.2)
    # overlapping collectives on two threads count once; the part outside the step not at all
    assert exposed_share(step, [(0, 2)], [(1, 5), (3, 6), (9, 14)]) == pytest.approx((4 + 1) / 10)
    # a collective hidden under compute is not exposed, nor is compute without communication
    assert exposed_share(step, [(0, 10)], [(2, 5)]) == 0.0
    assert exposed_share(step, [(0, 5)], []) == 0.0
    # a synchronous collective on the compute thread inside a compute span blocks it: exposed
    assert exposed_share(step, [(0, 10)], [(2, 3), (6, 8)], blocked=[(2, 3)]) == pytest.approx(0.1)
    # communication with nothing computing at all is exposed all along; an empty step is 0
    assert exposed_share((2.0, 4.0), [], [(0, 10)]) == pytest.approx(1.0)
    assert exposed_share((1.0, 1.0), [], [(0, 10)]) == 0.0


def test_interval_arithmetic():
    assert union([(5, 6), (0, 2), (1, 3), (3, 4), (7, 7)]) == [(0, 4), (5, 6)]
    assert subtract([(0, 10)], [(2, 3), (5, 12), (-1, 1)]) == [(1, 2), (3, 5)]
    assert subtract([(0, 1), (2, 3)], []) == [(0, 1), (2, 3)]


def test_span_names_say_op_algorithm_tag_and_bytes():
    span = CollectiveSpan("all_reduce", "ring", 24 * 2**20, "bucket 3", 0.0, 1.0, 1, "ringtrain-comm")
    assert collective_name(span) == "all_reduce ring bucket 3 24.0 MiB"
    assert collective_name(CollectiveSpan("all_gather", "rhd", 12, None, 0.0, 1.0, 1, "x")) == "all_gather rhd 12 B"
    assert [human_bytes(n) for n in (0, 1023, 1024, 52 * 1024 + 512, 3 * 2**30)] == \
        ["0 B", "1023 B", "1.0 KiB", "52.5 KiB", "3.0 GiB"]


def test_tracer_attaches_only_inside_a_step_and_records_from_any_thread():
    comms = {"dp": SimpleNamespace(tracer=None), "ep": SimpleNamespace(tracer=None)}
    tracer = StepTracer(rank=3, label="test")
    tracer.begin(5, comms)
    assert all(callable(c.tracer) for c in comms.values())

    def collectives(i):
        for k in range(200):
            comms["ep" if i % 2 else "dp"].tracer(
                CollectiveSpan("all_to_all", "ring", 8, f"bucket {k}", 1.0, 2.0, 1000 + i, f"worker {i}"))

    threads = [threading.Thread(target=collectives, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wrapped = tracer.methods(SimpleNamespace(clip_grad_norm_=lambda n: n * 2, comm="c"), clip_grad_norm_="clip")
    assert wrapped.clip_grad_norm_(3) == 6 and wrapped.comm == "c"
    with tracer.span("forward", micro=0):
        pass
    tracer.end(5)
    assert all(c.tracer is None for c in comms.values())
    names = [s.name for s in tracer.spans]
    assert len(names) == 800 + 3 and {"clip", "forward", "step 5"} <= set(names)
    assert {s.args["communicator"] for s in tracer.spans if s.cat == "comm"} == {"dp", "ep"}
    assert tracer.thread_name(1001, "worker 1") == "worker 1 (ep)"
    # off: the engine's hook returns the object itself and one shared null context
    obj = object()
    assert NO_TRACE.methods(obj, clip_grad_norm_="clip") is obj
    assert NO_TRACE.span("forward") is NO_TRACE.span("backward")


def test_the_loop_component_traces_its_steps_and_nothing_else(tmp_path):
    """trainer.loop.Tracing with a stand-in engine: hooks attached exactly during steps 2 and 3."""
    import torch

    from trainer.config import LoopConfig
    from trainer.loop import RunInfo, Tracing

    comm = SimpleNamespace(tracer=None)
    seen = []

    class Engine:
        comms = SimpleNamespace(dp=comm, ep=None, expert_dp=None)
        trace = NO_TRACE

        def describe(self):
            return "stand-in"

        def train_step(self, step):
            seen.append((step + 1, self.trace is not NO_TRACE, comm.tracer is not None))
            with self.trace.span("forward"):
                if comm.tracer is not None:
                    comm.tracer(CollectiveSpan("all_reduce", "ring", 4, "bucket 0", 0.0, 0.0, 7, "ringtrain-comm"))

    engine = Engine()
    info = RunInfo(LoopConfig(trace_steps=[2, 3]), 8, torch.device("cpu"), 0, 1, 1.0, None)
    tracing = Tracing(engine, info, tmp_path, end=4)
    for step in range(4):
        tracing.before_step(step + 1)
        engine.train_step(step)
        tracing.after_step(step + 1, None)
    assert seen == [(1, False, False), (2, True, True), (3, True, True), (4, False, False)]
    assert engine.trace is NO_TRACE and comm.tracer is None
    assert sorted({s.step for s in tracing.tracer.spans}) == [2, 3]
    assert sorted(p.name for p in (tmp_path / "trace").iterdir()) == ["step_3.png", "trace_rank0.json"]


@pytest.mark.parametrize("value", ["[3,2]", "[0,1]", "[1]", "[1,2,3]"])
def test_bad_trace_steps_name_the_key(value):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"trainer.trace_steps={value}"])
    with pytest.raises(ConfigError, match=r"trainer\.trace_steps must .*got \["):
        load_config(cfg)


def test_bad_trace_steps_exit_2_before_anything_starts(tmp_path):
    r = subprocess.run([sys.executable, "-m", "trainer.train", "trainer.trace_steps=[3,2]",
                        f"hydra.run.dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "ringtrain: config error: trainer.trace_steps must" in r.stderr and "[3, 2]" in r.stderr


# -- one traced run -------------------------------------------------------------------
def test_every_rank_writes_a_chrome_trace_named_for_perfetto(runs):
    for rank in (0, 1):
        trace = _trace(runs.traced, rank)
        procs = [e for e in trace["traceEvents"] if e["ph"] == "M" and e["name"] == "process_name"]
        assert [p["args"]["name"] for p in procs] == [f"rank {rank}"]
        assert sorted(_threads(trace).values()) == ["main", "ringtrain-comm"]
        assert {e["pid"] for e in trace["traceEvents"]} == {rank}
        assert [e["name"] for e in _spans(trace, cat="step")] == [f"step {n}" for n in TRACED]
        assert trace["otherData"]["steps"] == list(TRACED)
    log = (runs.traced / "train.log").read_text()
    assert "trace_rank<r>.json" in log and "step_3.png" in log and "exposed communication" in log


def test_compute_spans_on_main_for_traced_steps_only(runs):
    trace = _trace(runs.traced)
    main = _main_tid(trace)
    for name, per_step in (("forward", 2), ("backward", 2), ("clip", 1), ("optimizer", 1), ("gradient sync", 1)):
        spans = _spans(trace, name=name)
        assert all(s["tid"] == main for s in spans), name
        steps = [s["args"]["step"] for s in spans]
        assert sorted(steps) == sorted(list(TRACED) * per_step), (name, steps)  # none of steps 1 and 4
    assert sorted(s["args"]["micro"] for s in _spans(trace, name="forward")) == [0, 0, 1, 1]


def test_every_bucket_is_all_reduced_off_the_main_thread_in_each_traced_step(runs):
    trace = _trace(runs.traced)
    main, grads = _main_tid(trace), _metrics(runs.traced)[0]["mem_grads_bytes"]
    buckets = [s for s in _spans(trace, cat="comm") if (s["args"]["tag"] or "").startswith("bucket")]
    tags = sorted({s["args"]["tag"] for s in buckets}, key=lambda t: int(t.split()[1]))
    assert len(tags) >= 3 and tags == [f"bucket {i}" for i in range(len(tags))]
    for step in TRACED:
        mine = [s for s in buckets if s["args"]["step"] == step]
        assert sorted(s["args"]["tag"] for s in mine) == sorted(tags), step  # each bucket once
        assert sum(s["args"]["bytes"] for s in mine) == grads  # together: every gradient
        for s in mine:
            a = s["args"]
            assert a["op"] == "all_reduce" and a["algorithm"] == "ring" and s["tid"] != main
            assert s["name"] == f"all_reduce ring {a['tag']} {human_bytes(a['bytes'])}"
            assert _threads(trace)[s["tid"]] == "ringtrain-comm"


def test_times_are_inside_their_step(runs):
    for rank in (0, 1):
        trace = _trace(runs.traced, rank)
        step = {s["args"]["step"]: s for s in _spans(trace, cat="step")}
        assert step[TRACED[0]]["ts"] == 0  # relative to the first traced step's start
        assert step[TRACED[0]]["ts"] + step[TRACED[0]]["dur"] <= step[TRACED[1]]["ts"]
        for s in _spans(trace):
            outer = step[s["args"]["step"]]
            assert s["ts"] >= outer["ts"] and s["dur"] >= 0, s
            assert s["ts"] + s["dur"] <= outer["ts"] + outer["dur"] + 0.01, s  # rounding to 1 ns


def test_exposed_share_in_the_trace_is_recomputed_from_its_events(runs):
    trace = _trace(runs.traced)
    main = _main_tid(trace)
    for n in TRACED:
        spans = [s for s in _spans(trace) if s["args"]["step"] == n]
        iv = lambda s: (s["ts"], s["ts"] + s["dur"])  # noqa: E731
        (step,) = [iv(s) for s in spans if s["cat"] == "step"]
        compute = [iv(s) for s in spans if s["cat"] == "compute"]
        comm = [iv(s) for s in spans if s["cat"] == "comm"]
        blocked = [iv(s) for s in spans if s["cat"] == "comm" and s["tid"] == main]
        assert blocked  # the non-finite flags all-reduce runs synchronously on main
        share = trace["otherData"]["exposed_share"][str(n)]
        assert 0 < share < 1 and share == pytest.approx(exposed_share(step, compute, comm, blocked), abs=1e-6)


def test_rank_0_draws_the_last_traced_step(runs):
    pngs = sorted(p.name for p in (runs.traced / "trace").glob("*.png"))
    assert pngs == [f"step_{TRACED[1]}.png"]
    data = (runs.traced / "trace" / pngs[0]).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width > 600 and height > 200
    from matplotlib.image import imread
    assert imread(runs.traced / "trace" / pngs[0]).std() > 0.05  # not a blank canvas


def test_tracing_does_not_change_training(runs):
    traced, plain = _metrics(runs.traced), _metrics(runs.plain)
    assert [r["step"] for r in traced] == [r["step"] for r in plain] == [1, 2, 3, 4]
    for a, b in zip(traced, plain):
        assert a["loss"] == b["loss"] and a["grad_norm"] == b["grad_norm"], (a, b)
        assert math.isfinite(a["loss"])
    assert not (runs.plain / "trace").exists()


def test_zero3_traces_its_gathers_and_reduce_scatters(runs):
    trace = _trace(runs.zero3)  # trace_steps=[2,9] on a 2-step run: step 2 only
    assert trace["otherData"]["steps"] == [2] and (runs.zero3 / "trace" / "step_2.png").is_file()
    comm = _spans(trace, cat="comm")
    ops = {(s["args"]["op"], s["args"]["tag"]) for s in comm}
    gathered = {tag for op, tag in ops if op == "all_gather"}
    scattered = {tag for op, tag in ops if op == "reduce_scatter"}
    assert len(gathered) >= 3 and gathered == scattered, ops  # every unit gathered and reduce-scattered
    assert all(s["tid"] != _main_tid(trace) for s in comm if s["args"]["op"] == "all_gather")
