"""Reduction operators and the buffer splits shared by every algorithm.

Precision: every hand-written algorithm combines two operands with one torch
op (`add_`, `maximum`, `minimum`). For float16 / bfloat16 those ops compute in
float32 and round once, so a hop costs one rounding. Algorithms that move the
whole vector at every step anyway (tree) widen half-precision input to float32
for the whole reduction and round once at the end; see each algorithm's doc.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch

ReduceOpName = Literal["sum", "avg", "max", "min"]
REDUCE_OPS: tuple[str, ...] = get_args(ReduceOpName)

HALF_DTYPES = (torch.float16, torch.bfloat16)


def combine_(acc: torch.Tensor, other: torch.Tensor, op: str) -> None:
    """acc <- acc (op) other, in place. `avg` reduces as a sum; `finish_` divides."""
    if op in ("sum", "avg"):
        acc.add_(other)
    elif op == "max":
        torch.maximum(acc, other, out=acc)
    else:
        torch.minimum(acc, other, out=acc)


def combine_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, op: str) -> None:
    """out <- a (op) b without touching a or b (out may alias a)."""
    if op in ("sum", "avg"):
        torch.add(a, b, out=out)
    elif op == "max":
        torch.maximum(a, b, out=out)
    else:
        torch.minimum(a, b, out=out)


def finish_(t: torch.Tensor, op: str, world_size: int) -> None:
    """Turns a reduced sum into an average when op is `avg`."""
    if op == "avg" and world_size > 1:
        t.div_(world_size)


def split_bounds(n: int, parts: int) -> list[int]:
    """Offsets of `parts` contiguous pieces of n elements, sizes differing by at most one.

    The first n % parts pieces get the extra element (as torch.tensor_split).
    """
    base, extra = divmod(n, parts)
    bounds = [0]
    for i in range(parts):
        bounds.append(bounds[-1] + base + (1 if i < extra else 0))
    return bounds


def split_sizes(n: int, parts: int) -> list[int]:
    b = split_bounds(n, parts)
    return [b[i + 1] - b[i] for i in range(parts)]
