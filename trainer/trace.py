"""Tracing a few optimizer steps (`trainer.trace_steps=[first, last]`): who computes, what travels, when.

For the traced steps only, a `StepTracer` records

- compute spans on the thread that runs them: "forward" and "backward" per micro-step,
  "clip" and "optimizer" (the native engine marks them through its `trace` attribute,
  see `NO_TRACE`), a "gradient sync" span while the step waits for the last reductions,
  and one "step N" span around the whole step;
- every collective of the engine's communicators (dp, ep, expert_dp), through
  `Communicator.tracer`, on the thread that ran it: the background "ringtrain-comm" thread
  for the asynchronous bucket reductions and ZeRO-3's gathers, the main thread for the
  synchronous ones. A span is named "<op> <algorithm> [<tag>] <bytes>", e.g.
  "all_reduce ring bucket 3 24.0 MiB".

Outside the traced steps nothing is attached: the communicators' tracer is None and the
engine's `trace` is `NO_TRACE`, whose spans are one shared null context.

`write` puts `trace_rank<r>.json` (Chrome's trace event format: ui.perfetto.dev or
chrome://tracing open it) into the trace folder on every rank, and on rank 0 the caller
adds `step_<N>.png` (`plot_step`), a timeline of one step with its exposed communication
share (`exposed_share`, the definition is there). Times are the host's `time.perf_counter`;
on CUDA every compute span starts and ends with a device synchronisation (and the
communicator synchronises its stream before a collective's span ends), so a span covers
its kernels; the synchronisations change the timing of the traced steps, not their results.
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch

from parallel.collectives import CollectiveSpan, Communicator

Interval = tuple[float, float]

COMPUTE = ("forward", "backward", "clip", "optimizer")
"""Span names that are computation (the exposed share's C)."""


# -- interval arithmetic -------------------------------------------------------------
def union(intervals: Iterable[Interval]) -> list[Interval]:
    """Sorted, disjoint, non-empty intervals covering exactly the points of `intervals`."""
    out: list[list[float]] = []
    for a, b in sorted((a, b) for a, b in intervals if b > a):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def subtract(a: Iterable[Interval], b: Iterable[Interval]) -> list[Interval]:
    """The points of union(a) that are not in union(b)."""
    out, cut = [], union(b)
    for lo, hi in union(a):
        for c_lo, c_hi in cut:
            if c_hi <= lo or c_lo >= hi:
                continue
            if c_lo > lo:
                out.append((lo, c_lo))
            lo = max(lo, c_hi)
            if lo >= hi:
                break
        if lo < hi:
            out.append((lo, hi))
    return out


def intersect(a: Iterable[Interval], b: Iterable[Interval]) -> list[Interval]:
    """The points in both union(a) and union(b)."""
    a = union(a)
    return subtract(a, subtract(a, b))


def length(intervals: Iterable[Interval]) -> float:
    return sum(b - a for a, b in union(intervals))


def exposed_intervals(step: Interval, compute: Iterable[Interval], collectives: Iterable[Interval],
                      blocked: Iterable[Interval] = ()) -> list[Interval]:
    """The parts of `step` where communication is exposed; see `exposed_share`."""
    computing = subtract(compute, blocked)
    return subtract(intersect(collectives, [step]), computing)


def exposed_share(step: Interval, compute: Iterable[Interval], collectives: Iterable[Interval],
                  blocked: Iterable[Interval] = ()) -> float:
    """The exposed communication share of one step, in [0, 1]:

        E = (K ∩ S) \\ (C \\ B)          share = |E| / |S|

    S is the step's interval (its "step N" span), K the union of the intervals of every
    collective of the step, on any thread, C the union of its compute spans (forward,
    backward, clip, optimizer), and B the union of the collectives that ran on the compute
    thread itself: a synchronous collective blocks the thread that called it, so inside a
    compute span (the clip's norm all-reduce under ZeRO, ZeRO-1/2's parameter all-gather in
    "optimizer") that thread communicates rather than computes. In words: the fraction of the
    step's wall time during which at least one collective was in flight and no compute was
    running. Waiting for a gradient bucket ("gradient sync") is not compute, so a bucket still
    on the wire then is exposed; the main thread waiting inside a compute span for an
    asynchronous collective (ZeRO-3's prefetched gather arriving late) cannot be seen and
    counts as compute. |X| is the total length of a union of intervals."""
    lo, hi = step
    if hi <= lo:
        return 0.0
    return length(exposed_intervals(step, compute, collectives, blocked)) / (hi - lo)


# -- naming -------------------------------------------------------------------------
def human_bytes(n: float) -> str:
    """512 B, 51.2 KiB, 24.0 MiB, 1.5 GiB."""
    if n < 1024:
        return f"{int(n)} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"
    raise AssertionError("unreachable")


def collective_name(span: CollectiveSpan) -> str:
    """"<op> <algorithm> [<tag>] <bytes>", e.g. "all_reduce ring bucket 3 24.0 MiB"."""
    parts = [span.op, span.algorithm] + ([span.tag] if span.tag else []) + [human_bytes(span.nbytes)]
    return " ".join(parts)


# -- the engine's hook ---------------------------------------------------------------
class NoTrace:
    """An engine's `trace` outside the traced steps: every span is one shared null context."""

    _null = contextlib.nullcontext()

    def span(self, name: str, **args):
        return self._null

    def methods(self, obj, **spans: str):
        """`obj` itself (see StepTracer.methods)."""
        return obj


NO_TRACE = NoTrace()


class _Timed:
    """`obj` with the methods named in `spans` run inside a span of the tracer (the rest as they are)."""

    def __init__(self, obj, tracer: "StepTracer", spans: dict[str, str]):
        self._obj, self._tracer, self._spans = obj, tracer, spans

    def __getattr__(self, name):
        attr = getattr(self._obj, name)
        if name not in self._spans:
            return attr

        @functools.wraps(attr)
        def timed(*args, **kwargs):
            with self._tracer.span(self._spans[name]):
                return attr(*args, **kwargs)
        return timed


# -- the tracer ---------------------------------------------------------------------
@dataclass
class Span:
    """One recorded interval (time.perf_counter seconds) on one thread."""

    name: str
    cat: str              # "step", "compute", "wait" or "comm"
    step: int
    start: float
    end: float
    tid: int
    thread: str
    args: dict = field(default_factory=dict)


class StepTracer:
    """Records the spans of the traced steps of one rank (see the module docstring).

    `begin(step, communicators)` before the step attaches a tracer to every communicator,
    `end(step)` after it detaches them and closes the "step N" span; in between the engine
    calls `span(name)` / `methods(...)`. Appends are thread-safe (one lock)."""

    def __init__(self, *, rank: int, device: torch.device | None = None, label: str = ""):
        self.rank, self.label = rank, label
        self._cuda = device is not None and device.type == "cuda"
        self._device = device
        self._lock = threading.Lock()
        self.spans: list[Span] = []
        self.step: int | None = None
        self._step_start = 0.0
        self._attached: list[Communicator] = []
        self._comm_of_thread: dict[int, str] = {}
        self.main_tid = threading.main_thread().ident

    def _sync(self) -> None:
        if self._cuda:
            torch.cuda.synchronize(self._device)

    def _add(self, span: Span) -> None:
        with self._lock:
            self.spans.append(span)

    # -- the step ---------------------------------------------------------
    def begin(self, step: int, communicators: dict[str, Communicator]) -> None:
        """Step `step` (1-based) starts now: trace every collective issued until `end`."""
        self._sync()
        self.step = step
        for name, comm in communicators.items():
            comm.tracer = functools.partial(self._on_collective, step, name)
            self._attached.append(comm)
        self._step_start = time.perf_counter()

    def end(self, step: int) -> None:
        """Step `step` is done: close its span and detach from the communicators."""
        self._sync()
        me = threading.current_thread()
        self._add(Span(f"step {step}", "step", step, self._step_start, time.perf_counter(), me.ident,
                       me.name, {"step": step}))
        for comm in self._attached:
            comm.tracer = None
        self._attached, self.step = [], None

    def _on_collective(self, step: int, comm: str, span: CollectiveSpan) -> None:
        recorded = Span(collective_name(span), "comm", step, span.start, span.end, span.thread_id, span.thread_name,
                        {"op": span.op, "algorithm": span.algorithm, "tag": span.tag, "bytes": span.nbytes,
                         "communicator": comm, "step": step})
        with self._lock:
            self.spans.append(recorded)
            if span.thread_id != self.main_tid:
                self._comm_of_thread.setdefault(span.thread_id, comm)

    # -- the engine's hook -------------------------------------------------
    @contextlib.contextmanager
    def span(self, name: str, **args):
        """A compute span (COMPUTE names) or a wait span (any other name) on the calling thread."""
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            me = threading.current_thread()
            self._add(Span(name, "compute" if name in COMPUTE else "wait", self.step or 0, start,
                           time.perf_counter(), me.ident, me.name, {"step": self.step, **args}))

    def methods(self, obj, **spans: str):
        """`obj` whose methods named as keys run inside a span named by the value, e.g.
        methods(wrapper, clip_grad_norm_="clip", optimizer_step="optimizer")."""
        return _Timed(obj, self, spans)

    # -- reading it back ----------------------------------------------------
    def steps(self) -> list[int]:
        return sorted({s.step for s in self.spans if s.cat == "step"})

    def of_step(self, step: int) -> list[Span]:
        return [s for s in self.spans if s.step == step]

    def exposed(self, step: int) -> tuple[float, list[Interval], Interval]:
        """(exposed share, exposed intervals, the step's interval) of a recorded step."""
        spans = self.of_step(step)
        (s,) = [(x.start, x.end) for x in spans if x.cat == "step"]
        compute = [(x.start, x.end) for x in spans if x.cat == "compute"]
        comm = [(x.start, x.end) for x in spans if x.cat == "comm"]
        compute_tids = {x.tid for x in spans if x.cat == "compute"}
        blocked = [(x.start, x.end) for x in spans if x.cat == "comm" and x.tid in compute_tids]
        return exposed_share(s, compute, comm, blocked), exposed_intervals(s, compute, comm, blocked), s

    def thread_name(self, tid: int, name: str) -> str:
        if tid == self.main_tid:
            return "main"
        comm = self._comm_of_thread.get(tid, "dp")
        return name if comm == "dp" else f"{name} ({comm})"

    def chrome_trace(self) -> dict:
        """Chrome's trace event format: complete events ("X", microseconds from the first traced
        step's start), pid = rank, tid = thread, and process / thread names."""
        steps = [s for s in self.spans if s.cat == "step"]
        t0 = min((s.start for s in steps), default=0.0)
        events: list[dict] = [
            {"name": "process_name", "ph": "M", "pid": self.rank, "args": {"name": f"rank {self.rank}"}},
            {"name": "process_sort_index", "ph": "M", "pid": self.rank, "args": {"sort_index": self.rank}},
        ]
        threads = {}
        for s in self.spans:
            threads.setdefault(s.tid, self.thread_name(s.tid, s.thread))
        for i, (tid, name) in enumerate(sorted(threads.items(), key=lambda kv: (kv[0] != self.main_tid, kv[1]))):
            events.append({"name": "thread_name", "ph": "M", "pid": self.rank, "tid": tid, "args": {"name": name}})
            events.append({"name": "thread_sort_index", "ph": "M", "pid": self.rank, "tid": tid,
                           "args": {"sort_index": i}})
        for s in sorted(self.spans, key=lambda s: (s.start, -s.end)):
            events.append({"name": s.name, "cat": s.cat, "ph": "X", "pid": self.rank, "tid": s.tid,
                           "ts": round((s.start - t0) * 1e6, 3), "dur": round((s.end - s.start) * 1e6, 3),
                           "args": s.args})
        exposed = {str(n): self.exposed(n)[0] for n in self.steps()}
        return {"traceEvents": events, "displayTimeUnit": "ms",
                "otherData": {"rank": self.rank, "label": self.label, "steps": self.steps(),
                              "exposed_share": exposed}}

    def write(self, folder: Path) -> Path:
        """`folder`/trace_rank<r>.json."""
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"trace_rank{self.rank}.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.chrome_trace()))
        tmp.replace(path)
        return path


# -- the picture --------------------------------------------------------------------
COLORS = {"forward": "#3a5a9b", "backward": "#7fa7e0", "clip": "#e78ac3", "optimizer": "#9ccf4f",
          "wait": "#d0d0d0", "all_reduce": "#ff9f1c", "reduce_scatter": "#a0522d", "all_gather": "#17becf",
          "all_to_all": "#9467bd", "broadcast": "#bcbd22", "exposed": "#d62728"}
"""Compute spans in blues, pink and green, waiting grey, collectives by op, exposed time red."""


def _lane_key(s: Span, tracer: StepTracer) -> tuple:
    """Buckets in index order first, then untagged collectives per thread and op."""
    tag = s.args.get("tag")
    m = re.fullmatch(r"bucket (\d+)", tag or "")
    if m:
        return (0, int(m.group(1)), tag)
    if tag:
        return (1, 0, tag)
    return (2, 0, f"{tracer.thread_name(s.tid, s.thread)}: {s.args['op']}")


def plot_step(tracer: StepTracer, step: int, path: Path) -> float:
    """A PNG timeline of one recorded step: a compute lane, one lane per bucket (other
    collectives one lane per thread and op) and the exposed intervals; returns the share."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    share, exposed, (s0, s1) = tracer.exposed(step)
    spans = tracer.of_step(step)
    ms = lambda t: (t - s0) * 1e3  # noqa: E731
    comm = [s for s in spans if s.cat == "comm"]
    keys = sorted({_lane_key(s, tracer) for s in comm})
    lanes = ["compute"] + [k[2] for k in keys] + ["exposed"]
    row = {name: i for i, name in enumerate(lanes)}
    fig = Figure(figsize=(11, 1.6 + 0.32 * len(lanes)), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    used = {}

    def bar(lane, a, b, color, label):
        ax.broken_barh([(ms(a), max(ms(b) - ms(a), 1e-3))], (row[lane] - 0.4, 0.8), facecolors=color,
                       edgecolor="none")
        used.setdefault(label, color)

    for s in spans:
        if s.cat in ("compute", "wait"):
            bar("compute", s.start, s.end, COLORS.get(s.name, COLORS["wait"]), s.name)
    for s in comm:
        bar(_lane_key(s, tracer)[2], s.start, s.end, COLORS.get(s.args["op"], "#7f7f7f"), s.args["op"])
    for a, b in exposed:
        bar("exposed", a, b, COLORS["exposed"], "exposed communication")
    ax.set_yticks(range(len(lanes)), lanes)
    ax.set_ylim(len(lanes) - 0.4, -0.6)
    ax.set_xlim(0, ms(s1))
    ax.set_xlabel("ms since the step started")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(handles=[Patch(color=c, label=n) for n, c in used.items()], loc="upper left",
              bbox_to_anchor=(1.005, 1.0), fontsize=8, frameon=False)
    ax.set_title(f"rank {tracer.rank}, step {step}: {tracer.label}\n"
                 f"exposed communication {share:.1%} of the step's {ms(s1):.2f} ms", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return share
