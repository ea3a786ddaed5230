"""The precision policy, and the step that unscales, checks, clips and applies.

A policy names four dtypes (`precision=fp32|fp16|bf16`):

    name   params in compute   autocast   gradient communication     master weights
    fp32   float32             -          float32                    (the params)
    bf16   bfloat16            bfloat16   float32 (bfloat16 on ask)  float32
    fp16   float16             float16    float32 (float16 on ask)   float32

With a half policy the model's parameters are held in half precision (the forward
and backward run on them); the data-parallel wrapper keeps float32 master weights
(DDP: one per parameter; ZeRO: only this rank's shards), receives the half gradients
into buffers of the communication dtype, and the optimizer updates the masters; the
half copy is refreshed from the masters after each applied step. Buffers (RoPE
tables, Performer features) stay float32. fp16 adds dynamic loss scaling
(parallel/loss_scale.py); bf16 has fp32's exponent range and needs none.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from .loss_scale import DynamicLossScaler

log = logging.getLogger("ringtrain.precision")

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class PrecisionPolicy:
    """Dtypes of one run; build with `PrecisionPolicy.from_name`."""

    name: str
    param_dtype: torch.dtype
    autocast_dtype: torch.dtype | None
    reduce_dtype: torch.dtype
    master_dtype: torch.dtype = torch.float32

    @classmethod
    def from_name(cls, name: str, *, grad_reduce: str = "fp32") -> "PrecisionPolicy":
        if name not in _DTYPES:
            raise ValueError(f"precision.name must be one of {list(_DTYPES)}, got {name!r}")
        if grad_reduce not in ("fp32", "half"):
            raise ValueError(f"precision.grad_reduce must be 'fp32' or 'half', got {grad_reduce!r}")
        dtype = _DTYPES[name]
        reduce = dtype if grad_reduce == "half" else torch.float32
        return cls(name, dtype, None if name == "fp32" else dtype, reduce)

    @property
    def mixed(self) -> bool:
        """Half parameters with float32 masters."""
        return self.param_dtype != self.master_dtype

    @property
    def needs_loss_scaling(self) -> bool:
        return self.param_dtype == torch.float16

    def autocast(self, device: torch.device):
        """Autocast for forward: keeps softmax-like ops in float32 where torch knows to."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.autocast_dtype)


def build_loss_scaler(policy: PrecisionPolicy, cfg) -> DynamicLossScaler | None:
    """The fp16 scaler from the precision config's fields; None for fp32 and bf16."""
    if not policy.needs_loss_scaling:
        return None
    return DynamicLossScaler(init_scale=cfg.init_scale, growth_factor=cfg.growth_factor,
                             backoff_factor=cfg.backoff_factor, growth_interval=cfg.growth_interval,
                             hysteresis=cfg.hysteresis, min_scale=cfg.min_scale, max_scale=cfg.max_scale,
                             on_min_scale=cfg.on_min_scale)


class StepOutcome(NamedTuple):
    """What `unscale_clip_step` did; the same on every rank."""

    norm: torch.Tensor               # global gradient norm (after unscaling, before clipping)
    stepped: bool                    # the optimizer step was applied
    nonfinite: bool                  # some rank's loss or some gradient was inf / nan
    nonfinite_ranks: list[int]       # ranks whose own loss was not finite


@torch.no_grad()
def unscale_clip_step(wrapper, scaler: DynamicLossScaler | None, *, max_norm: float,
                      loss: torch.Tensor | None = None, report_overflow: bool = False) -> StepOutcome:
    """After finish_gradient_sync: divide the gradients by the loss scale, measure the
    global norm, and apply the optimizer step unless this rank's `loss` or some gradient
    on some rank is non-finite (one small max all-reduce, so every rank decides alike).
    With a scaler that is an fp16 overflow and the scaler backs off; without one the
    step is simply not applied and the caller decides (skip or stop).
    `wrapper` is a DataParallel or ZeroModel."""
    if scaler is not None:
        grads = wrapper.master_grads()
        if grads:
            torch._foreach_mul_(grads, 1.0 / scaler.scale)
    norm = wrapper.clip_grad_norm_(max_norm)  # global over ranks and shards: inf/nan if any is
    world = wrapper.comm.world_size
    flags = torch.zeros(world + 1, device=norm.device)  # (loss not finite on rank r..., norm not finite)
    flags[wrapper.comm.rank] = float(loss is not None and not bool(torch.isfinite(loss).all()))
    flags[world] = float(not math.isfinite(float(norm)))
    wrapper.comm.all_reduce(flags, op="max")
    flags = flags.tolist()
    nonfinite, ranks = any(flags), [r for r in range(world) if flags[r]]
    if scaler is None:
        if not nonfinite:
            wrapper.optimizer_step()
        return StepOutcome(norm, not nonfinite, nonfinite, ranks)
    if nonfinite and report_overflow:
        _report_nonfinite(wrapper, scaler)
    stepped = scaler.update(nonfinite)
    if stepped:
        wrapper.optimizer_step()
    return StepOutcome(norm, stepped, nonfinite, ranks)


def _report_nonfinite(wrapper, scaler: DynamicLossScaler) -> None:
    """Rank 0 logs the first parameters (on any rank's shards) whose gradients are not finite."""
    import torch.distributed as dist

    mine = wrapper.nonfinite_grad_names(limit=8)
    everyone = [mine]
    if dist.is_initialized() and wrapper.comm.world_size > 1:
        everyone = [None] * wrapper.comm.world_size
        dist.all_gather_object(everyone, mine, group=wrapper.comm.group)
    if wrapper.comm.rank == 0:
        names = sorted({n for names in everyone for n in names})
        log.warning(f"overflow at loss scale {scaler.scale:g}: step skipped; non-finite gradients in "
                    f"{', '.join(names[:8]) or '(none found after unscaling)'}"
                    + (" ..." if len(names) > 8 else ""))
