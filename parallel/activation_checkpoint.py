"""Activation checkpointing: blocks that keep only their input in forward and recompute the rest
in backward (torch.utils.checkpoint, non-reentrant).

    none        nothing recomputed
    full        every decoder block: a block's activations live only while its backward runs
    selective   every other block (0, 2, 4, ...), torchtitan's layer-wise frequency 2: about half
                the saving for half the recomputation

The recomputation goes around the module's hooks on purpose: the block's `forward` (an instance
attribute set here) calls `checkpoint(original forward)`, so the hooks of `block(...)` (ZeRO-3's
gather before forward and free after it, its gather before backward) run once, as without
checkpointing; recomputing inside backward finds the parameters that the pre-backward hook
gathered. Data parallelism's gradient hooks sit on the parameters and fire once, in backward.
Autocast and the RNG state are replayed by torch.utils.checkpoint, so mixed precision and dropout
recompute exactly what the forward computed.

With context parallelism, recomputing a block repeats its attention's cp traffic (ring
attention's K-1 K/V hops, or the linear kinds' one state all-gather) in backward; the trainer's
cp_bytes_per_step shows it.
"""

from __future__ import annotations

import functools

from torch import nn
from torch.utils.checkpoint import checkpoint

MODES = ("none", "full", "selective")


def checkpointed_blocks(n_blocks: int, mode: str) -> list[int]:
    """Indices of the blocks that `mode` recomputes."""
    if mode not in MODES:
        raise ValueError(f"trainer.activation_checkpointing must be one of {list(MODES)}, got {mode!r}")
    if mode == "none":
        return []
    return list(range(n_blocks)) if mode == "full" else list(range(0, n_blocks, 2))


def _recomputed(forward, *args, **kwargs):
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def apply_activation_checkpointing(blocks: list[nn.Module], mode: str) -> list[int]:
    """Makes the blocks `mode` picks recompute their activations in backward (in place); returns
    their indices."""
    chosen = checkpointed_blocks(len(blocks), mode)
    for i in chosen:
        block = blocks[i]
        if getattr(block, "_ringtrain_checkpointed", False):
            raise ValueError(f"block {i} is already checkpointed")
        block.forward = functools.partial(_recomputed, block.forward)
        block._ringtrain_checkpointed = True
    return chosen
