"""Validated entry points: one signature per op, an algorithm picked by name.

Each `plan_*` checks its arguments on the calling rank (before any message is
sent), flattens the tensors, and returns a closure that runs the chosen
algorithm and copies results back into non-contiguous outputs. The functional
forms below run the plan at once; `Communicator` can also run it in the
background and hand back a waitable handle.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist

from . import alltoall, hier, native, rhd, ring, tree  # noqa: F401  (fill the registry)
from .checks import check_device, check_numel, check_op, check_pair, check_splits, check_tensor
from .reduce_ops import split_bounds
from .registry import Tuning, lookup
from .transport import Transport

DEFAULT_TUNING = Tuning()


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1) if t.is_contiguous() else t.contiguous().view(-1)


def _write_back(dst: torch.Tensor, flat: torch.Tensor) -> None:
    if dst.data_ptr() != flat.data_ptr() or not dst.is_contiguous():
        dst.copy_(flat.view(dst.shape))


def plan_all_reduce(tp: Transport, tensor, *, op: str = "sum", algorithm: str = "ring",
                    tuning: Tuning = DEFAULT_TUNING) -> Callable[[], None]:
    impl = lookup("all_reduce", algorithm)
    check_tensor("tensor", tensor)
    check_op(op, tensor.dtype)
    check_device("tensor", tensor, tp.group)

    def run():
        flat = _flat(tensor)
        impl(tp, flat, op, tuning)
        _write_back(tensor, flat)

    return run


def plan_reduce_scatter(tp: Transport, output, input, *, op: str = "sum", algorithm: str = "ring",
                        tuning: Tuning = DEFAULT_TUNING) -> Callable[[], None]:
    impl = lookup("reduce_scatter", algorithm)
    check_tensor("input", input)
    check_tensor("output", output)
    check_pair("input", input, "output", output)
    check_op(op, input.dtype)
    check_device("input", input, tp.group)
    b = split_bounds(input.numel(), tp.size)
    check_numel("output", output, b[tp.rank + 1] - b[tp.rank],
                f"piece {tp.rank} of {input.numel()} input elements over {tp.size} ranks")

    def run():
        out = _flat(output)
        impl(tp, out, _flat(input), op, tuning)
        _write_back(output, out)

    return run


def plan_all_gather(tp: Transport, output, input, *, algorithm: str = "ring",
                    tuning: Tuning = DEFAULT_TUNING) -> Callable[[], None]:
    impl = lookup("all_gather", algorithm)
    check_tensor("input", input)
    check_tensor("output", output)
    check_pair("input", input, "output", output)
    check_device("input", input, tp.group)
    b = split_bounds(output.numel(), tp.size)
    check_numel("input", input, b[tp.rank + 1] - b[tp.rank],
                f"piece {tp.rank} of {output.numel()} output elements over {tp.size} ranks")

    def run():
        out = _flat(output)
        impl(tp, out, _flat(input), tuning)
        _write_back(output, out)

    return run


def plan_all_to_all(tp: Transport, output, input, *, output_split_sizes=None, input_split_sizes=None,
                    algorithm: str = "ring", tuning: Tuning = DEFAULT_TUNING) -> Callable[[], None]:
    impl = lookup("all_to_all", algorithm)
    check_tensor("input", input)
    check_tensor("output", output)
    check_pair("input", input, "output", output)
    check_device("input", input, tp.group)
    p = tp.size
    if input_split_sizes is None:
        if input.numel() % p:
            raise ValueError(f"input has {input.numel()} elements, not divisible by {p} ranks; "
                             "pass input_split_sizes")
        input_split_sizes = [input.numel() // p] * p
    if output_split_sizes is None:
        if output.numel() % p:
            raise ValueError(f"output has {output.numel()} elements, not divisible by {p} ranks; "
                             "pass output_split_sizes")
        output_split_sizes = [output.numel() // p] * p
    ins = check_splits("input_split_sizes", input_split_sizes, p, input.numel(), "input")
    outs = check_splits("output_split_sizes", output_split_sizes, p, output.numel(), "output")
    if ins[tp.rank] != outs[tp.rank]:
        raise ValueError(f"input_split_sizes[{tp.rank}] = {ins[tp.rank]} must equal "
                         f"output_split_sizes[{tp.rank}] = {outs[tp.rank]} (this rank's piece to itself)")

    def run():
        out = _flat(output)
        impl(tp, out, _flat(input), outs, ins, tuning)
        _write_back(output, out)

    return run


def plan_broadcast(tp: Transport, tensor, src: int, *, algorithm: str = "tree",
                   tuning: Tuning = DEFAULT_TUNING) -> Callable[[], None]:
    impl = lookup("broadcast", algorithm)
    check_tensor("tensor", tensor)
    check_device("tensor", tensor, tp.group)
    if not isinstance(src, int) or not 0 <= src < tp.size:
        raise ValueError(f"src must be a group rank in [0, {tp.size}), got {src!r}")

    def run():
        flat = _flat(tensor)
        impl(tp, flat, src, tuning)
        _write_back(tensor, flat)

    return run


# Functional forms: run at once on `group` (the default group when None).

def all_reduce(tensor, group=None, *, op="sum", algorithm="ring", tuning=DEFAULT_TUNING) -> None:
    """In-place all-reduce of `tensor` over `group` with the named algorithm."""
    plan_all_reduce(Transport(group), tensor, op=op, algorithm=algorithm, tuning=tuning)()


def reduce_scatter(output, input, group=None, *, op="sum", algorithm="ring", tuning=DEFAULT_TUNING) -> None:
    """output <- this rank's piece of the reduction of `input` (pieces: split_bounds)."""
    plan_reduce_scatter(Transport(group), output, input, op=op, algorithm=algorithm, tuning=tuning)()


def all_gather(output, input, group=None, *, algorithm="ring", tuning=DEFAULT_TUNING) -> None:
    """output <- every rank's `input`, concatenated in rank order."""
    plan_all_gather(Transport(group), output, input, algorithm=algorithm, tuning=tuning)()


def all_to_all(output, input, group=None, *, output_split_sizes=None, input_split_sizes=None,
               algorithm="ring", tuning=DEFAULT_TUNING) -> None:
    """Piece j of `input` goes to rank j; piece i of `output` comes from rank i."""
    plan_all_to_all(Transport(group), output, input, output_split_sizes=output_split_sizes,
                    input_split_sizes=input_split_sizes, algorithm=algorithm, tuning=tuning)()


def broadcast(tensor, src: int, group=None, *, algorithm="tree", tuning=DEFAULT_TUNING) -> None:
    """`tensor` on every rank <- `tensor` of group rank `src`."""
    plan_broadcast(Transport(group), tensor, src, algorithm=algorithm, tuning=tuning)()


def exchange_split_sizes(input_split_sizes, group=None) -> list[int]:
    """Tells every rank how much each peer will send it (the counts before an all-to-all)."""
    tp = Transport(group)
    sizes = torch.tensor([int(s) for s in input_split_sizes], dtype=torch.int64)
    check_numel("input_split_sizes", sizes, tp.size, "one entry per rank")
    if str(dist.get_backend(tp.group)).lower() == "nccl":
        sizes = sizes.cuda()
    out = torch.empty_like(sizes)
    plan_all_to_all(tp, out, sizes, algorithm="native")()
    return out.tolist()
