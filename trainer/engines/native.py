"""`engine=native`: ringtrain's own data parallelism (DDP or ZeRO 1-3) over its collectives."""

from __future__ import annotations

import contextlib
import logging
import math

import torch

from parallel.mesh import Comms
from parallel.precision import PrecisionPolicy, build_loss_scaler, unscale_clip_step

from ..checkpoint import EngineState
from ..config import LoopConfig, OptimConfig, ParallelConfig, PrecisionConfig
from ..optim import adamw_factory, lr_at, set_lr
from ..parallelize import parallelize
from ..trace import NO_TRACE
from . import NonFiniteLossError, StepResult

log = logging.getLogger("ringtrain.train")


def check(tc, *, cuda: bool) -> None:
    """Every parallelism, precision and expert-parallel layout in the config runs natively."""


class NativeEngine:
    """The trainer's step on a `parallelize`d model; see Engine (engines/__init__.py)."""

    def __init__(self, *, model, comms: Comms, parallel: ParallelConfig, precision: PrecisionConfig,
                 optim: OptimConfig, loop: LoopConfig, device: torch.device):
        self.model, self.comms, self.device = model, comms, device
        self.parallel_name, self.precision_name = parallel.name, precision.name
        # half parameters in compute, float32 masters inside the wrapper; gradients travel in reduce_dtype
        self.policy = PrecisionPolicy.from_name(precision.name, grad_reduce=precision.grad_reduce)
        self.wrapper = parallelize(model, comms, parallel, self.policy, weight_decay=optim.weight_decay,
                                   activation_checkpointing=loop.activation_checkpointing)
        self.optimizer = self.wrapper.build_optimizer(adamw_factory(optim))
        self.scaler = build_loss_scaler(self.policy, precision)  # fp16 only
        self.optim_cfg, self.max_steps, self.grad_accum = optim, loop.max_steps, loop.grad_accum
        self.clip = optim.grad_clip if optim.grad_clip > 0 else math.inf
        self.on_nonfinite, self.report_overflow = loop.on_nonfinite, precision.report_overflow
        self.skipped_nonfinite = 0  # fp32 / bf16 steps skipped for a non-finite loss (checkpointed)
        self.trace = NO_TRACE  # a StepTracer during trainer.trace_steps (set by the loop's Tracing)

    @property
    def skipped_steps(self) -> int:
        """Steps not applied (fp16 overflows, or non-finite losses skipped): the schedule ignores them."""
        return self.scaler.state.skipped_steps if self.scaler else self.skipped_nonfinite

    def train_step(self, batches, step: int) -> StepResult:
        lr = lr_at(step - self.skipped_steps, self.optim_cfg, self.max_steps)  # a skipped step does not count
        set_lr(self.optimizer, lr)
        self.model.set_step(step)  # Performer redraws its features here, identically on every rank
        scale = self.scaler.scale if self.scaler else 1.0  # fp16: keeps small gradients representable
        loss_sum = torch.zeros((), device=self.device)
        for micro in range(self.grad_accum):
            x, y = batches.next_batch()                          # (B, T) int64 each
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            # all but the last micro-step keep their gradients local; the last one's backward
            # launches each unit's reduction as soon as the unit is complete
            last = micro == self.grad_accum - 1
            with (contextlib.nullcontext() if last else self.wrapper.no_sync()):
                with self.trace.span("forward", micro=micro), self.policy.autocast(self.device):
                    _, loss = self.wrapper(x, y)                 # mean cross-entropy over B*T, float32
                with self.trace.span("backward", micro=micro):
                    self.wrapper.backward(loss * (scale / self.grad_accum))
            loss_sum += loss.detach()
        with self.trace.span("gradient sync"):
            self.wrapper.finish_gradient_sync()                  # averaged over data-parallel ranks
        # unscale, global norm (across shards under ZeRO), skip everywhere if any rank overflowed,
        # clip, step on the float32 masters, refresh / all-gather the parameters in compute
        stepper = self.trace.methods(self.wrapper, clip_grad_norm_="clip", optimizer_step="optimizer")
        out = unscale_clip_step(stepper, self.scaler, max_norm=self.clip, loss=loss_sum,
                                report_overflow=self.report_overflow)
        if out.nonfinite and self.scaler is None:                # fp32 / bf16: no scale to lower
            self._nonfinite(step, out)
        self.wrapper.zero_grad()
        return StepResult(loss_sum / self.grad_accum, out.norm, lr, out.stepped)

    def _nonfinite(self, step: int, out) -> None:
        message = (f"non-finite loss at step {step + 1} on rank(s) {out.nonfinite_ranks}" if out.nonfinite_ranks
                   else f"non-finite gradients at step {step + 1} (the loss was finite on every rank; "
                        "averaging spreads one rank's inf to all)")
        if self.on_nonfinite == "stop":
            raise NonFiniteLossError(f"{message}; trainer.on_nonfinite=stop")
        self.skipped_nonfinite += 1
        if self.comms.dp.rank == 0:
            log.warning(f"{message}: step skipped (trainer.on_nonfinite=skip, {self.skipped_nonfinite} so far)")

    def eval_loss(self, x, y):
        with self.policy.autocast(self.device):
            _, loss = self.wrapper(x.to(self.device), y.to(self.device))
        return loss

    def state_dict(self) -> EngineState:
        # float32 (master) weights, gathered from the shards under ZeRO; rank 0's copy
        return EngineState(model=self.wrapper.consolidated_state_dict(), sharded=self.wrapper.optimizer_state(),
                           local={"loss_scaler": self.scaler.state_dict() if self.scaler else None,
                                  "skipped_nonfinite": self.skipped_nonfinite})

    def sharded_template(self) -> dict:
        return self.wrapper.optimizer_state(materialize=True)

    def load_state_dict(self, state: EngineState) -> None:
        if self.scaler is not None and state.local.get("loss_scaler"):
            self.scaler.load_state_dict(state.local["loss_scaler"])
        self.skipped_nonfinite = state.local.get("skipped_nonfinite", 0)

    def model_state_bytes(self) -> dict[str, int]:
        return self.wrapper.model_state_bytes()

    def metrics(self) -> dict:
        """fp16: the loss scale and the overflow counters; fp32 / bf16: steps skipped for a non-finite loss."""
        if self.scaler is None:
            return {"skipped_steps": self.skipped_nonfinite}
        st = self.scaler.state
        return {"loss_scale": st.scale, "skipped_steps": st.skipped_steps, "consecutive_overflows": st.consecutive_overflows}

    def comm_stats(self):
        return self.comms.dp.stats

    def describe(self) -> str:
        cp = getattr(self.model, "cp", None)
        return (f"engine native, {self.parallel_name}, {self.precision_name} "
                f"over {self.comms.dp.algorithm}" + (f", {cp.describe()}" if cp is not None else ""))

    def close(self) -> None:
        pass
