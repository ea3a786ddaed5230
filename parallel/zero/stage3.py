"""ZeRO-3's parameter life cycle: gather a block's units just before they are needed, free them after.

Each unit's full parameters live in `unit.full`, whose storage is resized to nothing while
the unit is idle. Forward: the root unit (embeddings, head, final norm) is gathered when the
model's forward starts and stays gathered to the end of backward, since the tied embedding is
used at both ends; a block's units are gathered just before its forward, and the next block's
gather is started while it computes; they are freed right after. Backward runs the blocks in
reverse: a block's units are gathered again before its backward (the previous block's gather
started meanwhile) and freed as soon as its last gradient is staged for the reduce-scatter
(`on_launched`), so at most two blocks (plus the root unit) hold full parameters at any moment.

The all-gather writes into `gather_target`, a second tensor over the same storage: the
parameters' views (saved by autograd for backward) must not see a version bump when their
storage is refilled with the same values.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from ..flat_params import FlatUnit


class Stage3Gather:
    """Gathers and frees `units` (with .block set) around the forward and backward of `blocks`."""

    def __init__(self, module: nn.Module, units: list[FlatUnit], blocks: list[nn.Module]):
        self.grad_sync = None  # set by the owner: reaps finished reductions before a backward
        self._of_block: dict[int, list[FlatUnit]] = {}
        self._gathered: set[int] = set(range(len(units)))
        self._handles: dict[int, object] = {}
        self._targets: dict[int, torch.Tensor] = {}
        self.units = units
        for u in units:
            self._of_block.setdefault(u.block, []).append(u)
            self._targets[u.index] = torch.empty(0, dtype=u.full.dtype, device=u.full.device).set_(
                u.full.untyped_storage(), 0, (u.padded,))
        self.free_all()
        module.register_forward_pre_hook(lambda m, a: self._gather_root())
        for bi, block in enumerate(blocks):
            block.register_forward_pre_hook(lambda m, a, bi=bi: self._pre_forward(bi))
            block.register_forward_hook(lambda m, a, o, bi=bi: self._post_forward(bi))
            block.register_full_backward_pre_hook(lambda m, g, bi=bi: self._pre_backward(bi))

    def is_gathered(self, unit: FlatUnit) -> bool:
        return unit.index in self._gathered

    def _block_units(self, bi: int) -> list[FlatUnit]:
        """Units of block bi (none past either end, so prefetching a neighbour is safe)."""
        return self._of_block.get(bi, []) if bi >= 0 else []

    def free(self, unit: FlatUnit) -> None:
        if unit.index in self._gathered:
            unit.full.untyped_storage().resize_(0)
            self._gathered.discard(unit.index)

    def free_all(self) -> None:
        for u in self.units:
            self.free(u)

    def on_launched(self, unit: FlatUnit) -> None:
        """Every gradient of a block unit is in staging and on its way (the reduce-scatter reads the
        staging buffer, not the parameters): backward needs its parameters no more."""
        if unit.block >= 0:
            self.free(unit)

    def _start(self, unit: FlatUnit) -> None:
        if unit.index in self._gathered or unit.index in self._handles:
            return
        unit.full.untyped_storage().resize_(unit.padded * unit.full.element_size())
        source = unit.half_shard if unit.half_shard is not None else unit.shard.detach()
        self._handles[unit.index] = unit.comm.all_gather(self._targets[unit.index], source, async_op=True,
                                                             tag=f"bucket {unit.index}")

    def _wait(self, unit: FlatUnit) -> None:
        self._start(unit)
        handle = self._handles.pop(unit.index, None)
        if handle is not None:
            handle.wait()
        self._gathered.add(unit.index)

    def _gather_root(self) -> None:
        for u in self._of_block.get(-1, []):
            self._wait(u)

    def _pre_forward(self, bi: int) -> None:
        for u in self._block_units(bi):
            self._wait(u)
        for u in self._block_units(bi + 1):  # prefetch the next block while this one computes
            self._start(u)

    def _post_forward(self, bi: int) -> None:
        for u in self._block_units(bi):
            self.free(u)

    def _pre_backward(self, bi: int) -> None:
        self.grad_sync.reap()
        for u in self._block_units(bi):
            self._wait(u)
        for u in self._block_units(bi - 1):  # backward runs the blocks in reverse
            self._start(u)

    @contextlib.contextmanager
    def gathered(self):
        """Every unit's full parameters inside, freed again after."""
        for u in self.units:
            self._wait(u)
        try:
            yield
        finally:
            self.free_all()
