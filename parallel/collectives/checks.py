"""Argument validation, run on the calling rank before any communication.

Every error names the argument at fault, so a bad call fails fast and locally
instead of leaving the other ranks waiting on a message that never comes.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .reduce_ops import REDUCE_OPS

SUPPORTED_DTYPES = (
    torch.float64, torch.float32, torch.float16, torch.bfloat16,
    torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8,
)


def check_tensor(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided:
        raise ValueError(f"{name} must be a dense (strided) tensor, got layout {t.layout}")
    if t.dtype not in SUPPORTED_DTYPES:
        names = ", ".join(str(d).removeprefix("torch.") for d in SUPPORTED_DTYPES)
        raise TypeError(f"{name} has dtype {t.dtype}; supported dtypes: {names}")


def check_op(op: str, dtype: torch.dtype) -> None:
    if op not in REDUCE_OPS:
        raise ValueError(f"op must be one of {list(REDUCE_OPS)}, got {op!r}")
    if op == "avg" and not dtype.is_floating_point:
        raise TypeError(f"op='avg' needs a floating-point tensor, got dtype {dtype}")


def check_pair(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    if a.dtype != b.dtype:
        raise TypeError(f"{name_b} has dtype {b.dtype} but {name_a} has dtype {a.dtype}; they must match")
    if a.device != b.device:
        raise ValueError(f"{name_b} is on {b.device} but {name_a} is on {a.device}; they must match")


def check_numel(name: str, t: torch.Tensor, expected: int, why: str) -> None:
    if t.numel() != expected:
        raise ValueError(f"{name} has {t.numel()} elements but must have {expected} ({why})")


def check_device(name: str, t: torch.Tensor, group) -> None:
    """gloo works on CPU tensors, NCCL on CUDA tensors; say so before sending."""
    backend = str(dist.get_backend(group)).lower()
    if backend == "gloo" and t.device.type != "cpu":
        raise ValueError(f"{name} is on {t.device} but the process group's backend is gloo (CPU tensors only)")
    if backend == "nccl" and t.device.type != "cuda":
        raise ValueError(f"{name} is on {t.device} but the process group's backend is nccl (CUDA tensors only)")


def check_splits(name: str, splits, world_size: int, total: int, tensor_name: str) -> list[int]:
    splits = [int(s) for s in splits]
    if len(splits) != world_size:
        raise ValueError(f"{name} has {len(splits)} entries but the group has {world_size} ranks")
    if any(s < 0 for s in splits):
        raise ValueError(f"{name} has a negative entry: {splits}")
    if sum(splits) != total:
        raise ValueError(f"{name} adds up to {sum(splits)} but {tensor_name} has {total} elements")
    return splits
