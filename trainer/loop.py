"""The training loop: each component before the step, the engine's step, each component after it.

    for step in range(start, end):
        for component in components:            # [Tracing,] Metrics (with evaluation), Checkpointing, Progress
            component.before_step(step + 1)
        result = engine.train_step(batches, step)
        for component in components:
            component.after_step(step + 1, result)

`Metrics` keeps a window of steps and, every trainer.log_every steps and at evaluation
steps, writes one record to metrics.jsonl and the logger (rank 0), with the validation
loss when trainer.eval_every says so. `Checkpointing` saves through the one checkpointer
every trainer.ckpt_every steps and at the end, and tells `Metrics` how long it took (saving
is not training time). `Progress` is rank 0's bar. `Tracing`, with trainer.trace_steps,
records the traced steps' compute and collectives (trainer/trace.py); it goes first, so the
other components' own collectives are not part of a step. None of them asks which engine runs.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from parallel.collectives import Communicator
from parallel.memory import peak_memory_mb

from .checkpoint import CheckpointManager
from .config import LoopConfig
from .data import ShardedBatches, eval_batches
from .engines import Engine, StepResult
from .trace import NO_TRACE, StepTracer, plot_step

log = logging.getLogger("ringtrain.train")


@dataclass
class RunInfo:
    """What the components need to know about the run, built by trainer.train."""

    loop: LoopConfig
    seq_len: int
    device: torch.device
    dp_rank: int                   # among the data-parallel replicas (the ranks of a cp group share it)
    dp_size: int                   # replicas reading different sequences: world / cp
    flops_per_token: float
    peak_flops: float | None       # per device; None: no MFU (CPU without trainer.peak_tflops)
    rank: int = 0                  # global
    world_size: int = 1            # devices: dp_size x cp


class Validator:
    """Mean validation loss over trainer.eval_batches micro-batches per rank, all ranks."""

    def __init__(self, engine: Engine, val_tokens, comm: Communicator, info: RunInfo):
        self.engine, self.val_tokens, self.comm, self.info = engine, val_tokens, comm, info

    @torch.no_grad()
    def __call__(self) -> float:
        i, model = self.info, self.engine.model
        model.eval()
        total = torch.zeros(2, dtype=torch.float64, device=i.device)  # (loss sum, batches)
        for x, y in eval_batches(self.val_tokens, seq_len=i.seq_len, micro_batch_size=i.loop.micro_batch_size,
                                 dp_rank=i.dp_rank, dp_size=i.dp_size, max_batches=i.loop.eval_batches):
            total[0] += self.engine.eval_loss(x, y).double()
            total[1] += 1
        self.comm.all_reduce(total, op="sum")
        model.train()
        return (total[0] / total[1].clamp_min(1)).item()


class Component:
    """A part of the loop: called before and after every optimizer step (`step` / `done` count from 1)."""

    def before_step(self, step: int) -> None:
        pass

    def after_step(self, done: int, result: StepResult) -> None:
        pass


class Metrics(Component):
    """Windowed step metrics; see the module docstring for when a record is written."""

    def __init__(self, engine: Engine, comm: Communicator, info: RunInfo, validate: Validator, *,
                 ep_comm: Communicator | None = None, cp_comm: Communicator | None = None, sinks: tuple = ()):
        self.engine, self.comm, self.info, self.validate, self.sinks = engine, comm, info, validate, sinks
        self.ep_comm, self.cp_comm = ep_comm, cp_comm
        t = info.loop
        self.tokens_per_step = t.micro_batch_size * info.seq_len * t.grad_accum * info.dp_size
        self.last: dict = {}
        self._window = torch.zeros((), device=info.device)
        self._reset()

    def _counters(self) -> tuple[float, ...]:
        stats, a2a = self.engine.comm_stats(), self.ep_comm.stats if self.ep_comm is not None else None
        cp = self.cp_comm.stats if self.cp_comm is not None else None
        return (stats.bytes_sent if stats else 0.0, stats.wait_s if stats else 0.0,
                a2a.bytes_sent if a2a else 0.0, a2a.wait_s if a2a else 0.0,
                stats.inter_node_bytes if stats else 0.0,
                cp.bytes_sent if cp else 0.0, cp.wait_s if cp else 0.0)

    def _reset(self) -> None:
        self._window.zero_()
        self._steps, self._t0, self._c0 = 0, time.perf_counter(), self._counters()

    def exclude(self, seconds: float) -> None:
        """Time spent outside training (a checkpoint save) does not count towards step time."""
        self._t0 += seconds

    def after_step(self, done: int, result: StepResult) -> None:
        t = self.info.loop
        self._window += result.loss
        self._steps += 1
        is_eval = bool(t.eval_every and done % t.eval_every == 0) or done == t.max_steps
        if done % t.log_every and not is_eval:
            return
        record = self._record(done, result)
        if is_eval:
            record["val_loss"] = self.validate()
            record["val_ppl"] = math.exp(min(record["val_loss"], 50.0))
        for sink in self.sinks:
            sink(record)
        self.last = record
        self._reset()

    def _record(self, done: int, result: StepResult) -> dict:
        if self.info.device.type == "cuda":
            torch.cuda.synchronize(self.info.device)
        step_time = (time.perf_counter() - self._t0) / self._steps
        now, before = self._counters(), self._c0  # before this record's own reductions
        mean_loss = (self._window / self._steps).reshape(1).clone()
        self.comm.all_reduce(mean_loss, op="avg")  # the loss every rank saw
        seen = self.engine.comm_stats() is not None  # another library's gradient traffic is invisible here
        peak = self.info.peak_flops
        return {
            "step": done, "loss": mean_loss.item(), "lr": result.lr, "grad_norm": float(result.grad_norm),
            "tokens_per_s": self.tokens_per_step / step_time, "step_time_s": step_time,
            "mfu": (self.info.flops_per_token * self.tokens_per_step / step_time / (peak * self.info.world_size)
                    if peak else None),
            "comm_bytes_per_step": (now[0] - before[0]) / self._steps if seen else None,
            "comm_wait_s_per_step": (now[1] - before[1]) / self._steps if seen else None,
            **self._inter_node(now, before, seen),
            **self._context(now, before),
            **{f"mem_{k}_bytes": v for k, v in self.engine.model_state_bytes().items()},
            "peak_mem_mb": peak_memory_mb(self.info.device),
            **self.engine.metrics(),
            **self._moe(now, before),
        }

    def _inter_node(self, now, before, seen: bool) -> dict:
        """Bytes per step sent to other nodes, when the data-parallel group spans several."""
        comms = getattr(self.engine, "comms", None)
        if not seen or comms is None or comms.dp.layout.nodes == 1:
            return {}
        return {"inter_node_bytes_per_step": (now[4] - before[4]) / self._steps}

    def _context(self, now, before) -> dict:
        """Context parallelism's traffic per optimizer step, this rank's (every rank sends alike):
        bytes sent to the other cp ranks, and seconds blocked waiting for theirs."""
        if self.cp_comm is None:
            return {}
        return {"cp_bytes_per_step": (now[5] - before[5]) / self._steps,
                "cp_wait_s_per_step": (now[6] - before[6]) / self._steps}

    def _moe(self, now, before) -> dict:
        """MoE routing of the last micro-batch (mean over ranks) and the all-to-all traffic per step."""
        stats = self.engine.model.moe_stats()
        if not stats:
            return {}
        keys = sorted(stats)
        values = torch.stack([stats[k].float().to(self.info.device) for k in keys])
        self.comm.all_reduce(values, op="avg")
        out = {f"moe_{k}": v for k, v in zip(keys, values.tolist())}
        out["a2a_bytes_per_step"] = (now[2] - before[2]) / self._steps
        out["a2a_wait_s_per_step"] = (now[3] - before[3]) / self._steps
        return out


class Checkpointing(Component):
    """Saves every trainer.ckpt_every steps and at the last step of this launch."""

    def __init__(self, manager: CheckpointManager, engine: Engine, batches: ShardedBatches, *, every: int,
                 end: int, metrics: Metrics):
        self.manager, self.engine, self.batches = manager, engine, batches
        self.every, self.end, self.metrics = every, end, metrics

    def after_step(self, done: int, result: StepResult) -> None:
        if not ((self.every and done % self.every == 0) or done == self.end):
            return
        t0 = time.perf_counter()
        self.manager.save(done, self.engine.state_dict(), {"sampler": self.batches.state_dict()})
        self.metrics.exclude(time.perf_counter() - t0)


class Progress(Component):
    """Rank 0's progress bar, showing the last logged loss."""

    def __init__(self, metrics: Metrics, *, total: int, initial: int, enabled: bool):
        self.metrics = metrics
        self.bar = tqdm(total=total, initial=initial, disable=not enabled, dynamic_ncols=True, desc="train")

    def after_step(self, done: int, result: StepResult) -> None:
        if self.metrics.last.get("step") == done:
            self.bar.set_postfix(loss=f"{self.metrics.last['loss']:.3f}")
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


class Tracing(Component):
    """trainer.trace_steps=[first, last]: traces those steps (the ones this launch runs) and, after
    the last one, writes <run dir>/trace/trace_rank<r>.json on every rank and, on rank 0, the
    PNG of the last traced step (see trainer/trace.py). Outside them nothing is attached."""

    def __init__(self, engine: Engine, info: RunInfo, run_dir: Path, *, end: int):
        first, last = info.loop.trace_steps
        self.engine, self.folder = engine, Path(run_dir) / "trace"
        self.first, self.last = first, min(last, end)
        self.tracer = StepTracer(rank=info.rank, device=info.device, label=engine.describe())

    def _traced(self, step: int) -> bool:
        return self.first <= step <= self.last

    def before_step(self, step: int) -> None:
        if not self._traced(step):
            return
        comms = getattr(self.engine, "comms", None)  # the validator's and the metrics' traffic is not traced
        named = {n: getattr(comms, n, None) for n in ("dp", "cp", "ep", "expert_dp")}
        self.tracer.begin(step, {n: c for n, c in named.items() if c is not None})
        if hasattr(self.engine, "trace"):
            self.engine.trace = self.tracer

    def after_step(self, done: int, result: StepResult) -> None:
        if not self._traced(done):
            return
        if hasattr(self.engine, "trace"):
            self.engine.trace = NO_TRACE
        self.tracer.end(done)
        if done == self.last:
            self._write(done)

    def _write(self, last: int) -> None:
        path = self.tracer.write(self.folder)
        if self.tracer.rank != 0:
            return
        png = self.folder / f"step_{last}.png"
        share = plot_step(self.tracer, last, png)
        steps = self.tracer.steps()
        traced = f"steps {steps[0]}-{steps[-1]}" if len(steps) > 1 else f"step {steps[0]}"
        log.info(f"trace of {traced}: {path.parent}/trace_rank<r>.json on every rank "
                 f"(open in ui.perfetto.dev), {png} (step {last}: exposed communication {share:.1%})")


def run(engine: Engine, batches: ShardedBatches, components: list, *, start: int, end: int) -> None:
    """Steps start .. end - 1, each between every component's before_step and after_step."""
    with logging_redirect_tqdm():
        for step in range(start, end):
            for component in components:
                component.before_step(step + 1)
            result = engine.train_step(batches, step)
            for component in components:
                component.after_step(step + 1, result)

