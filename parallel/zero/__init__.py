"""ZeRO stages 1-3 over ringtrain's collectives: `apply_zero(model, comms, stage=...)`.

model.py holds the wrapper (what each stage shards), stage3.py ZeRO-3's gather / free /
prefetch, reshard.py the optimizer state any world size can read back.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..data_parallel import broadcast_module_state
from ..mesh import Comms
from .model import ZeroModel, ZeroStage

__all__ = ["ZeroModel", "ZeroStage", "apply_zero"]


def apply_zero(model: nn.Module, comms: Comms, *, stage: int, param_groups: list[dict], bucket_mb: float = 25.0,
               blocks: list[nn.Module] | None = None, param_dtype: torch.dtype | None = None,
               reduce_dtype: torch.dtype | None = None) -> ZeroModel:
    """Shards `model`'s training state over `comms.dp` (ZeRO `stage`) after making every rank's
    weights rank 0's. `blocks`: the stage-3 gather units (default: the model's `blocks`).
    `param_dtype` half: half parameters, float32 master shards; `reduce_dtype`: gradients'.
    With `comms.expert_dp` (after apply_expert_parallel) the expert slices are sharded over it."""
    broadcast_module_state(model, comms)
    if blocks is None:
        blocks = list(getattr(model, "blocks", []))
    return ZeroModel(model, comms, stage=stage, param_groups=param_groups, bucket_mb=bucket_mb, blocks=blocks,
                     param_dtype=param_dtype, reduce_dtype=reduce_dtype)
