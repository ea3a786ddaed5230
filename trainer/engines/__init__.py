"""Engines: who trains the model, behind one step-level interface (`Engine`).

    native      ringtrain's own DDP / ZeRO over its collectives (engines/native.py)
    deepspeed   DeepSpeed's engine at the same ZeRO stage, for comparison (engines/deepspeed.py)
    accelerate  Hugging Face Accelerate: DDP, or FSDP for zero2 / zero3 (engines/accelerate.py)

Each implements the whole step itself (accumulation, scaled backward, gradient
reduction, unscaling, clipping, the optimizer step and the learning-rate schedule), its
evaluation forward, and the state it hands the checkpointer. The loop (trainer/loop.py)
and the entry point (trainer/train.py) never ask which engine runs: `build_engine` is the
one place that maps `engine=` to a class.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Protocol

import torch

from ..checkpoint import EngineState


class NonFiniteLossError(RuntimeError):
    """trainer.on_nonfinite=stop and a rank's loss (or the gradients) became inf / nan."""


@dataclass
class StepResult:
    """One optimizer step, as every rank saw it."""

    loss: torch.Tensor
    """Mean micro-batch loss on this rank (0-dim, detached)."""
    grad_norm: torch.Tensor
    """Global gradient norm before clipping (nan where the engine does not report one)."""
    lr: float
    """Learning rate the step used."""
    applied: bool = True
    """False when the step was skipped (fp16 overflow, or a non-finite loss with on_nonfinite=skip)."""


class Engine(Protocol):
    """What the loop and the checkpointer need from an engine."""

    model: torch.nn.Module
    """The model as built (unwrapped): set_step, moe_stats, flops_per_token."""

    def train_step(self, batches, step: int) -> StepResult:
        """One optimizer step over trainer.grad_accum micro-batches drawn from `batches`."""

    def eval_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mean loss of one batch, forward only, through the wrapper (which may need to unshard)."""

    def state_dict(self) -> EngineState:
        """Collective: what the checkpointer saves (see trainer/checkpoint.py)."""

    def load_state_dict(self, state: EngineState) -> None:
        """Restores what state_dict gave; `state.sharded` arrives filled into `sharded_template()`."""

    def sharded_template(self) -> dict:
        """Collective: the sharded state's tensors to load into in place (materialized)."""

    def model_state_bytes(self) -> dict[str, int]:
        """Per-rank bytes of parameters, gradients and optimizer states ({} when the engine hides them)."""

    def metrics(self) -> dict:
        """Engine-specific metrics for the log record (loss scale, skipped steps ...)."""

    def comm_stats(self):
        """ringtrain's CommStats of the gradient traffic, or None when another library moves it."""

    def describe(self) -> str:
        """One phrase for the start-up log line: the engine, parallelism, precision, algorithm."""

    def close(self) -> None:
        """Releases what the engine started (communicator threads)."""


ENGINES = {"native": "NativeEngine", "deepspeed": "DeepSpeedEngine", "accelerate": "AccelerateEngine"}
"""`engine=` name -> the class in engines/<name>.py (each module imports its library only when built)."""


def _module(name: str):
    if name not in ENGINES:
        raise ValueError(f"engine must be one of {list(ENGINES)}, got {name!r}")
    return importlib.import_module(f"{__name__}.{name}")


def check_config(tc, *, cuda: bool) -> None:
    """What the chosen engine cannot run (its module's `check`): raises ValueError naming the keys."""
    if tc.engine != "native":  # both need the model's own forward and ringtrain's cp group
        if tc.parallel.cp_size > 1:
            raise ValueError(f"parallel.cp_size={tc.parallel.cp_size} (context parallelism) runs with engine=native; "
                             f"got engine={tc.engine}")
        if tc.trainer.activation_checkpointing != "none":
            raise ValueError(f"trainer.activation_checkpointing={tc.trainer.activation_checkpointing} runs with "
                             f"engine=native; got engine={tc.engine}")
    _module(tc.engine).check(tc, cuda=cuda)


def build_engine(name: str, **kwargs) -> Engine:
    """The engine called `name` (configs' `engine=`), built from plain config slices."""
    return getattr(_module(name), ENGINES[name])(**kwargs)
