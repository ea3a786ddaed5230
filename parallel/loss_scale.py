"""Dynamic loss scaling for fp16 training, written for ringtrain.

The loss is multiplied by `scale` before backward so that small fp16 gradients do not
flush to zero; the gradients are divided by it again before clipping and the step.
After every step the caller reports whether any gradient anywhere (every rank, every
shard) was non-finite, and the scaler decides whether the step may be applied:

- overflow: the step is skipped (no parameter, optimizer state or schedule change);
  `growth_tracker` restarts at 0. If `hysteresis_left` > 1 it is decremented and the
  scale kept (a tolerated overflow); otherwise the scale is multiplied by
  `backoff_factor` (never below `min_scale`). `hysteresis_left` is not refilled by a
  back-off, so with hysteresis h the first h - 1 overflows of a run of consecutive
  overflows are tolerated and every later one backs off.
- no overflow: `hysteresis_left` is refilled to `hysteresis`; `growth_tracker` counts
  up, and on reaching `growth_interval` the scale is multiplied by `growth_factor`
  (never above `max_scale`) and the tracker restarts.

With hysteresis 1 (the default) this is exactly torch.amp.GradScaler's rule (which has
no min/max; they only matter at the ends). Hysteresis > 1 follows DeepSpeed's
`hysteresis` with `consecutive_hysteresis=True`. An overflow at `min_scale` cannot be
fixed by scaling: the scaler warns and goes on, or raises if `on_min_scale="raise"`.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

log = logging.getLogger("ringtrain.loss_scale")


class LossScaleError(RuntimeError):
    """Overflow at the minimum loss scale with on_min_scale='raise'."""


@dataclass
class ScalerState:
    """Everything that must survive a checkpoint for a resumed run to scale identically."""

    scale: float
    growth_tracker: int = 0
    hysteresis_left: int = 1
    consecutive_overflows: int = 0
    skipped_steps: int = 0


class DynamicLossScaler:
    """See the module docstring. `update(found_inf)` returns whether to apply the step."""

    def __init__(self, *, init_scale: float = 2.0**16, growth_factor: float = 2.0, backoff_factor: float = 0.5,
                 growth_interval: int = 2000, hysteresis: int = 1, min_scale: float = 1.0,
                 max_scale: float = 2.0**24, on_min_scale: str = "warn"):
        checks = [(init_scale > 0, "init_scale", "be > 0", init_scale),
                  (growth_factor > 1, "growth_factor", "be > 1", growth_factor),
                  (0 < backoff_factor < 1, "backoff_factor", "be in (0, 1)", backoff_factor),
                  (growth_interval >= 1, "growth_interval", "be >= 1", growth_interval),
                  (hysteresis >= 1, "hysteresis", "be >= 1", hysteresis),
                  (0 < min_scale <= init_scale, "min_scale", f"be in (0, init_scale={init_scale}]", min_scale),
                  (max_scale >= init_scale, "max_scale", f"be >= init_scale={init_scale}", max_scale),
                  (on_min_scale in ("warn", "raise"), "on_min_scale", "be 'warn' or 'raise'", on_min_scale)]
        for ok, key, rule, value in checks:
            if not ok:
                raise ValueError(f"precision.{key} must {rule}, got {value!r}")
        self.growth_factor, self.backoff_factor = growth_factor, backoff_factor
        self.growth_interval, self.hysteresis = growth_interval, hysteresis
        self.min_scale, self.max_scale, self.on_min_scale = min_scale, max_scale, on_min_scale
        self.state = ScalerState(scale=float(init_scale), hysteresis_left=hysteresis)

    @property
    def scale(self) -> float:
        return self.state.scale

    def update(self, found_inf: bool) -> bool:
        """Advances the scale after one step's overflow check; True = apply the step."""
        s = self.state
        if not found_inf:
            s.consecutive_overflows = 0
            s.hysteresis_left = self.hysteresis
            s.growth_tracker += 1
            if s.growth_tracker == self.growth_interval:
                s.scale = min(s.scale * self.growth_factor, self.max_scale)
                s.growth_tracker = 0
            return True
        s.consecutive_overflows += 1
        s.skipped_steps += 1
        s.growth_tracker = 0
        if s.scale <= self.min_scale:
            msg = (f"gradients overflow at the minimum loss scale {self.min_scale:g} "
                   f"({s.consecutive_overflows} consecutive overflow(s)); lowering precision.min_scale "
                   "or training in bf16 may help")
            if self.on_min_scale == "raise":
                raise LossScaleError(msg)
            log.warning(msg)
        elif s.hysteresis_left > 1:
            s.hysteresis_left -= 1
        else:
            s.scale = max(s.scale * self.backoff_factor, self.min_scale)
        return False

    def state_dict(self) -> dict:
        return asdict(self.state)

    def load_state_dict(self, state: dict) -> None:
        self.state = ScalerState(**state)
