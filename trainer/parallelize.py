"""`parallelize`: every parallelism a model gets, applied in the one order in which they compose."""

from __future__ import annotations

from models.transformer import DecoderLM
from parallel.activation_checkpoint import apply_activation_checkpointing
from parallel.context_parallel import ContextShard, apply_context_parallel
from parallel.data_parallel import apply_ddp
from parallel.expert_parallel import apply_expert_parallel
from parallel.flat_model import FlatParamModel
from parallel.mesh import Comms
from parallel.precision import PrecisionPolicy
from parallel.zero import apply_zero

from .config import ParallelConfig


def parallelize(model: DecoderLM, comms: Comms, cfg: ParallelConfig, policy: PrecisionPolicy, *,
                weight_decay: float, activation_checkpointing: str = "none") -> FlatParamModel:
    """Applies, in this order:

    0. context parallelism (comms.cp, when parallel.cp_size > 1): the model keeps its rank's
       tokens of every sequence and its attention reaches the others through the cp group
       (parallel/context_parallel.py; causal softmax in the balanced layout);
       activation checkpointing of the blocks trainer.activation_checkpointing picks (before the
       wrappers below, whose hooks must see one forward per block);
    1. expert parallelism (comms.ep, when parallel.ep_size > 1): each rank keeps its slice of
       every MoE layer's experts (all ranks built the same full set) and routes tokens to them
       by all-to-all;
    2. data parallelism: dense weights replicated (DDP) or sharded (ZeRO, parallel.zero_stage)
       over every rank (comms.dp), each expert slice over the ranks that hold it
       (comms.expert_dp); half parameters in compute and float32 masters in mixed precision.

    The optimizer groups (decay / no decay) are taken after step 1, from the parameters the
    rank really holds. Returns the data-parallel wrapper; build its optimizer with
    `wrapper.build_optimizer`."""
    if comms.cp is not None:
        layout = "balanced" if model.attn_cfg.kind == "softmax" else "contiguous"
        apply_context_parallel(model, ContextShard(comms.cp, layout=layout, softmax_method=cfg.cp_softmax))
    apply_activation_checkpointing(list(model.blocks), activation_checkpointing)
    if comms.ep is not None:
        apply_expert_parallel(model, comms.ep)
    groups = model.param_groups(weight_decay)
    mixed = {"param_dtype": policy.param_dtype, "reduce_dtype": policy.reduce_dtype}
    if cfg.zero_stage == 0:
        return apply_ddp(model, comms, param_groups=groups, bucket_mb=cfg.bucket_mb,
                         first_bucket_mb=cfg.first_bucket_mb, find_unused_parameters=cfg.find_unused_parameters,
                         **mixed)
    return apply_zero(model, comms, stage=cfg.zero_stage, param_groups=groups, bucket_mb=cfg.bucket_mb,
                      blocks=list(model.blocks), **mixed)
