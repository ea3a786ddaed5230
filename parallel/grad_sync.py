"""Gradient synchronisation over flat units, overlapped with backward: the hooks and the launches.

A post-accumulate-grad hook on every trainable parameter counts the parameters of its
unit as backward finishes them. A unit with a whole-gradient buffer (DDP, ZeRO-1) is
all-reduced; a unit that keeps only its shard (ZeRO-2/3) has its gradients copied into
a staging buffer and reduce-scattered, the reduced shard added into `grad_shard`. Both
run on the Communicator's background thread while the rest of backward computes.

Launch order must be the same on every rank. `in_order=True` (DDP) launches units
strictly by index, so a bucket waits for the ones before it; `in_order=False` (ZeRO)
launches each unit once complete: the model is the same on every rank, so backward
completes units in the same order everywhere, and ZeRO-3 can free a block's
parameters as soon as its gradients are on their way.

Gradient accumulation: `no_sync()` keeps whole-gradient units local (their buffers
just accumulate); shard-only units reduce on every micro-step anyway, since there is
nothing local to accumulate into (as DeepSpeed's stage 2).

Staging (shard-only units): at most `staging_buffers` buffers per dtype exist, each the
size of the largest unit; when all are in use the oldest reduction is waited for. Only
if every one is held by a unit still filling (its gradients interleave with others') is
one more made, so backward never deadlocks.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch.nn as nn

from .flat_params import FlatUnit


class GradSync:
    """The hooks and launches for `units`; `names` maps id(param) to its name for errors."""

    def __init__(self, units: list[FlatUnit], names: dict[int, str], *, in_order: bool,
                 allow_unused: bool = False, staging_buffers: int = 3,
                 on_launched: Callable[[FlatUnit], None] | None = None):
        self.units, self.names, self.in_order = units, names, in_order
        self.allow_unused = allow_unused
        self.staging_buffers = staging_buffers
        self.on_launched = on_launched          # called once a unit's reduction is under way (ZeRO-3 frees)
        self.sync = True
        self._next = 0                          # in_order: index of the next unit to launch
        self._launched = 0                      # launches so far this step (orders the waits)
        self.pool: list[torch.Tensor] = []      # staging buffers not in use
        self._slot: dict[int, tuple[int, int]] = {}
        for unit in units:
            for pi, q in enumerate(unit.params):
                self._slot[id(q)] = (unit.index, pi)
                q.register_post_accumulate_grad_hook(self._on_grad_ready)

    @contextlib.contextmanager
    def no_sync(self):
        """Micro-steps inside accumulate whole-gradient units locally and send nothing."""
        previous, self.sync = self.sync, False
        try:
            yield
        finally:
            self.sync = previous

    # -- the hook ------------------------------------------------------------
    def _on_grad_ready(self, q: nn.Parameter) -> None:
        ui, pi = self._slot[id(q)]
        unit = self.units[ui]
        if unit.grad_full is not None:
            view = unit.grad_view(pi)
            if view.dtype != q.dtype:         # half gradients into a float32 buffer: add, drop
                view.add_(q.grad)
                q.grad = None
            elif q.grad.data_ptr() != view.data_ptr():  # .grad was replaced: bring it home
                view.copy_(q.grad)
                q.grad = view
            if not self.sync:
                return
        else:
            if unit.handle is not None:       # the previous micro-step's reduction of this unit
                self._complete(unit)
            if unit.staging is None:
                unit.staging = self._take_staging(unit)
            unit.staging[unit.slot(pi)].copy_(q.grad.reshape(-1))
            if not unit.ready:
                unit.staging[unit.numel:unit.padded].zero_()
            q.grad = None                     # only the shard is kept
        if pi in unit.ready:
            raise RuntimeError(
                f"parameter {self.names.get(id(q), '?')} got a gradient twice before finish_gradient_sync(); "
                "run backward once per synchronised micro-step (earlier micro-steps belong inside no_sync())")
        unit.ready.add(pi)
        if self.in_order:
            self._launch_ready()
        elif len(unit.ready) == len(unit.params):
            self._launch(unit)

    def _launch_ready(self, force: bool = False) -> None:
        while self._next < len(self.units):
            unit = self.units[self._next]
            if not force and len(unit.ready) < len(unit.params):
                return
            self._launch(unit)
            self._next += 1

    def _launch(self, unit: FlatUnit) -> None:
        prescale, op = unit.reduce
        if unit.grad_full is not None:
            if prescale != 1.0:
                unit.grad_full.mul_(prescale)
            if unit.comm.world_size > 1:
                unit.handle = unit.comm.all_reduce(unit.grad_full, op=op, async_op=True,
                                                   tag=f"bucket {unit.index}")
        else:
            grads = unit.staging[: unit.padded]
            if prescale != 1.0:
                grads.mul_(prescale)
            unit.incoming = unit.grad_shard.new_empty(unit.S)
            unit.handle = unit.comm.reduce_scatter(unit.incoming, grads, op=op, async_op=True,
                                                   tag=f"bucket {unit.index}")
            unit.ready.clear()                # the next micro-step's gradients start a new round
        self._launched += 1
        if self.on_launched is not None:
            self.on_launched(unit)
        unit.handle_order = self._launched

    def _complete(self, unit: FlatUnit) -> None:
        if unit.handle is not None:
            unit.handle.wait()
            unit.handle = None
        if unit.grad_full is None and unit.incoming is not None:
            unit.grad_shard.add_(unit.incoming)
            unit.incoming = None
            self.pool.append(unit.staging)
            unit.staging = None

    def reap(self) -> None:
        """Completes reductions that already finished (their staging buffers go back to the pool)."""
        for u in self.units:
            if u.handle is not None and u.handle.is_completed():
                self._complete(u)

    def _take_staging(self, unit: FlatUnit) -> torch.Tensor:
        self.reap()
        while True:
            dtype, device = unit.grad_dtype, unit.params[0].device
            for i, buf in enumerate(self.pool):
                if buf.dtype == dtype and buf.device == device and buf.numel() >= unit.padded:
                    return self.pool.pop(i)
            held = [u for u in self.units if u.staging is not None and u.grad_dtype == dtype]
            if len(held) < self.staging_buffers:
                size = max(u.padded for u in self.units if u.grad_dtype == dtype)
                return torch.zeros(size, dtype=dtype, device=device)
            inflight = [u for u in held if u.handle is not None]
            if not inflight:
                return torch.zeros(unit.padded, dtype=dtype, device=device)
            self._complete(min(inflight, key=lambda u: u.handle_order))

    # -- the end of backward ----------------------------------------------------
    def finish(self) -> None:
        """Waits until every unit is reduced; call after the last micro-step's backward.

        A parameter that got no gradient is an error naming it, unless allow_unused. Units
        still missing gradients are launched anyway (their slots hold zeros), so every rank
        issues the same collectives and none of them hangs on this one."""
        if not self.sync:
            return
        # a shard-only unit clears its ready set at launch, so a partly filled one is one
        # whose other parameters got no gradient
        missing = [self.names.get(id(q), "?") for u in self.units for i, q in enumerate(u.params)
                   if i not in u.ready and (u.grad_full is not None or u.ready)]
        if self.in_order:
            self._launch_ready(force=True)
        for u in self.units:
            if u.grad_full is None and u.ready:    # partly filled: the missing slots send zeros
                for i in range(len(u.params)):
                    if i not in u.ready:
                        u.staging[u.slot(i)].zero_()
                self._launch(u)
            elif not self.in_order and u.grad_full is not None and len(u.ready) < len(u.params):
                self._launch(u)
        for u in self.units:
            self._complete(u)
            u.ready.clear()
        self._next = 0
        if missing and not self.allow_unused:
            shown = ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else "")
            raise RuntimeError(
                f"{len(missing)} parameter(s) received no gradient this step: {shown}. If parts of the "
                "model are skipped on purpose, set parallel.find_unused_parameters=true")
