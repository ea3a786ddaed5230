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


@torch.no_grad()
def unscale_clip_step(wrapper, scaler: DynamicLossScaler | None, *, max_norm: float,
                      report_overflow: bool = False) -> tuple[torch.Tensor, bool]:
    """After finish_gradient_sync: divide the gradients by the loss scale, measure the
    global norm, and apply the optimizer step unless some gradient on some rank is
    non-finite. `wrapper` is a DataParallel or ZeroModel. Returns (norm, stepped)."""
    if scaler is None:
        norm = wrapper.clip_grad_norm_(max_norm)
        wrapper.optimizer_step()
        return norm, True
    grads = wrapper.master_grads()
    if grads:
        torch._foreach_mul_(grads, 1.0 / scaler.scale)
    norm = wrapper.clip_grad_norm_(max_norm)  # global over ranks and shards: inf/nan if any is
    flag = torch.tensor([0.0 if math.isfinite(float(norm)) else 1.0], device=norm.device)
    wrapper.comm.all_reduce(flag, op="max")  # every rank takes the same decision
    found_inf = bool(flag.item())
    if found_inf and report_overflow:
        _report_nonfinite(wrapper, scaler)
    if scaler.update(found_inf):
        wrapper.optimizer_step()
        return norm, True
    return norm, False


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
