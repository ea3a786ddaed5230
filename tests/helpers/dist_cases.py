"""Case functions run inside the worker pool (see harness.py): fn(rank, world, **kwargs).

Inputs are derived from (seed, rank) by `rank_input`, so the test process can
rebuild every rank's input and compute the float64 reference itself.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from parallel.collectives import NodeLayout
from parallel.collectives.nodes import build_level_groups
from parallel.collectives import (
    Communicator, Tuning, all_gather, all_reduce, all_to_all, broadcast, exchange_split_sizes,
    reduce_scatter, split_bounds,
)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "float64": torch.float64, "int32": torch.int32, "int64": torch.int64, "int8": torch.int8}


def rank_input(seed: int, rank: int, n: int, dtype: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1009 + rank)
    dt = DTYPES[dtype]
    if dt.is_floating_point:
        return torch.randn(n, generator=g, dtype=torch.float64).to(dt)
    hi = 20 if dt == torch.int8 else 1000
    return torch.randint(-hi, hi, (n,), generator=g, dtype=torch.int64).to(dt)


def a2a_splits(seed: int, world: int, max_piece: int) -> list[list[int]]:
    """splits[i][j]: elements rank i sends to rank j (some zero)."""
    return [[(seed + 3 * i + 5 * j + i * j) % (max_piece + 1) for j in range(world)] for i in range(world)]


def _strided(x: torch.Tensor) -> torch.Tensor:
    """The same values in a non-contiguous view."""
    base = torch.zeros(x.numel(), 2, dtype=x.dtype)
    view = base[:, 1]
    view.copy_(x)
    return view


_LAYOUT_COMMS: dict = {}


def layout_comm(world: int, node_of: tuple[int, ...], algorithm: str = "hier") -> Communicator:
    """A Communicator over the whole world that believes the ranks sit on nodes `node_of`,
    with its intra-/inter-node groups (made once per layout and algorithm, collectively)."""
    key = (tuple(node_of), algorithm)
    if key not in _LAYOUT_COMMS:
        layout = NodeLayout(tuple(node_of))
        levels = build_level_groups([list(range(world))], layout).get(tuple(range(world)))
        _LAYOUT_COMMS[key] = Communicator(dist.new_group(list(range(world))), algorithm=algorithm,
                                          layout=layout, levels=levels)
    return _LAYOUT_COMMS[key]


class _ViaCommunicator:
    """The functional forms' signatures, run through a layout-aware Communicator."""

    def __init__(self, comm: Communicator):
        self.comm = comm

    def all_reduce(self, x, *, op, algorithm, tuning):
        self.comm.tuning = tuning
        self.comm.all_reduce(x, op=op)

    def reduce_scatter(self, out, inp, *, op, algorithm, tuning):
        self.comm.tuning = tuning
        self.comm.reduce_scatter(out, inp, op=op)

    def all_gather(self, out, inp, *, algorithm, tuning):
        self.comm.tuning = tuning
        self.comm.all_gather(out, inp)

    def broadcast(self, x, src, *, algorithm, tuning):
        self.comm.tuning = tuning
        self.comm.broadcast(x, src)

    def all_to_all(self, out, inp, *, output_split_sizes, input_split_sizes, algorithm, tuning):
        self.comm.tuning = tuning
        self.comm.all_to_all(out, inp, output_split_sizes=output_split_sizes, input_split_sizes=input_split_sizes)


class _Functional:
    all_reduce = staticmethod(all_reduce)
    reduce_scatter = staticmethod(reduce_scatter)
    all_gather = staticmethod(all_gather)
    broadcast = staticmethod(broadcast)
    all_to_all = staticmethod(all_to_all)


def run_spec(rank: int, world: int, spec: dict) -> torch.Tensor:
    """One collective; with spec["layout"] (node of every rank) through layout_comm, else the functional form."""
    op, algo, dtype, n, seed = spec["op"], spec["algorithm"], spec["dtype"], spec["n"], spec["seed"]
    tuning = Tuning(*spec.get("tuning", (4 << 20, 2, 64 << 10)))
    c = _ViaCommunicator(layout_comm(world, spec["layout"], algo)) if spec.get("layout") else _Functional
    maybe_strided = _strided if spec.get("noncontig") else (lambda t: t)
    b = split_bounds(n, world)
    if op == "all_reduce":
        x = maybe_strided(rank_input(seed, rank, n, dtype))
        c.all_reduce(x, op=spec.get("reduce_op", "sum"), algorithm=algo, tuning=tuning)
        return x.clone()
    if op == "reduce_scatter":
        out = maybe_strided(torch.empty(b[rank + 1] - b[rank], dtype=DTYPES[dtype]))
        c.reduce_scatter(out, rank_input(seed, rank, n, dtype), op=spec.get("reduce_op", "sum"),
                       algorithm=algo, tuning=tuning)
        return out.clone()
    if op == "all_gather":
        out = maybe_strided(torch.empty(n, dtype=DTYPES[dtype]))
        c.all_gather(out, rank_input(seed, rank, n, dtype)[b[rank]:b[rank + 1]], algorithm=algo, tuning=tuning)
        return out.clone()
    if op == "broadcast":
        x = maybe_strided(rank_input(seed, rank, n, dtype))
        c.broadcast(x, seed % world, algorithm=algo, tuning=tuning)
        return x.clone()
    if op == "all_to_all":
        splits = spec.get("splits") or a2a_splits(seed, world, n)
        ins = splits[rank]
        outs = [splits[i][rank] for i in range(world)]
        out = maybe_strided(torch.empty(sum(outs), dtype=DTYPES[dtype]))
        c.all_to_all(out, rank_input(seed, rank, sum(ins), dtype), output_split_sizes=outs,
                   input_split_sizes=ins, algorithm=algo, tuning=tuning)
        return out.clone()
    raise ValueError(op)


def run_specs(rank: int, world: int, specs: list[dict]) -> list[torch.Tensor]:
    return [run_spec(rank, world, s) for s in specs]


def async_all_reduce(rank: int, world: int, algorithm: str, n: int, count: int) -> dict:
    """`count` asynchronous all-reduces in flight at once, then one synchronous one;
    the results and the communicator's stats (bytes_sent, calls)."""
    comm = Communicator(algorithm=algorithm, tuning=Tuning(256, 2, 0))
    xs = [rank_input(100 + i, rank, n, "float32") for i in range(count)]
    handles = [comm.all_reduce(x, async_op=True) for x in xs]
    last = rank_input(999, rank, n, "float32")
    comm.all_reduce(last)  # must wait for the queued ones, keeping message order
    for h in handles:
        h.wait()
    comm.close()
    return {"results": xs + [last], "bytes_sent": comm.stats.bytes_sent, "calls": comm.stats.calls}


def byte_counts(rank: int, world: int, specs: list[dict]) -> list[tuple[int, int]]:
    """Per spec, one collective through a fresh Communicator(algorithm=spec["algorithm"]);
    returns its stats (bytes_sent, calls). Ops the algorithm lacks take the fallback (ring).
    spec: op, algorithm, dtype, n, seed, and optionally tuning, async, src (broadcast)."""
    out = []
    for spec in specs:
        op, dtype, n, seed = spec["op"], spec["dtype"], spec["n"], spec["seed"]
        comm = Communicator(algorithm=spec["algorithm"], tuning=Tuning(*spec.get("tuning", (4 << 20, 2, 64 << 10))))
        kw = {"async_op": bool(spec.get("async"))}
        b = split_bounds(n, world)
        if op == "all_reduce":
            handle = comm.all_reduce(rank_input(seed, rank, n, dtype), **kw)
        elif op == "reduce_scatter":
            handle = comm.reduce_scatter(torch.empty(b[rank + 1] - b[rank], dtype=DTYPES[dtype]),
                                         rank_input(seed, rank, n, dtype), **kw)
        elif op == "all_gather":
            handle = comm.all_gather(torch.empty(n, dtype=DTYPES[dtype]),
                                     rank_input(seed, rank, n, dtype)[b[rank]:b[rank + 1]], **kw)
        elif op == "all_to_all":
            splits = a2a_splits(seed, world, n)
            outs = [splits[i][rank] for i in range(world)]
            handle = comm.all_to_all(torch.empty(sum(outs), dtype=DTYPES[dtype]),
                                     rank_input(seed, rank, sum(splits[rank]), dtype),
                                     output_split_sizes=outs, input_split_sizes=splits[rank], **kw)
        elif op == "broadcast":
            handle = comm.broadcast(rank_input(seed, rank, n, dtype), spec["src"], **kw)
        else:
            raise ValueError(op)
        if handle is not None:
            handle.wait()
        comm.close()
        out.append((comm.stats.bytes_sent, comm.stats.calls))
    return out


def bad_inputs(rank: int, world: int) -> dict[str, str]:
    """Every bad call must raise on the calling rank before sending; returns the messages."""
    f32, f16 = torch.zeros(8), torch.zeros(8, dtype=torch.float16)
    calls = {
        "reduce_scatter wrong output size": lambda: reduce_scatter(torch.zeros(3 + world), f32),
        "all_gather wrong input size": lambda: all_gather(torch.zeros(8), torch.zeros(9)),
        "dtype mismatch": lambda: reduce_scatter(torch.zeros(8 // world if 8 % world == 0 else 1,
                                                             dtype=torch.float16), f32),
        "unknown algorithm": lambda: all_reduce(f32, algorithm="butterfly"),
        "unknown op": lambda: all_reduce(f32, op="prod"),
        "avg on integers": lambda: all_reduce(torch.zeros(4, dtype=torch.int32), op="avg"),
        "algorithm without this op": lambda: reduce_scatter(torch.zeros(1), torch.zeros(world), algorithm="tree"),
        "input splits do not add up": lambda: all_to_all(torch.zeros(world), torch.zeros(world),
                                                         input_split_sizes=[2] * world,
                                                         output_split_sizes=[1] * world),
        "too few splits": lambda: all_to_all(torch.zeros(world), torch.zeros(world),
                                             input_split_sizes=[world], output_split_sizes=[1] * world),
        "not a tensor": lambda: all_reduce([1.0, 2.0]),
        "broadcast src out of range": lambda: broadcast(f32, world),
        "device mismatch": lambda: all_reduce(torch.zeros(2, device="meta")),
        "half vs float gather": lambda: all_gather(torch.zeros(8, dtype=torch.float16), f32),
    }
    del f16
    messages = {}
    for name, call in calls.items():
        try:
            call()
        except (ValueError, TypeError) as e:
            messages[name] = f"{type(e).__name__}: {e}"
        else:
            messages[name] = "NO ERROR"
    # the group is still usable: nothing was sent by the bad calls
    x = torch.full((5,), float(rank))
    all_reduce(x)
    messages["after"] = x.tolist()
    return messages


def split_size_exchange(rank: int, world: int) -> list[int]:
    return exchange_split_sizes([rank * 10 + j for j in range(world)])


def subgroup_all_reduce(rank: int, world: int, algorithm: str) -> list[float]:
    """All-reduce inside the group of even ranks and the group of odd ranks."""
    groups = [dist.new_group([r for r in range(world) if r % 2 == k]) for k in range(2)]
    x = torch.full((1000,), float(rank + 1))
    all_reduce(x, groups[rank % 2], algorithm=algorithm, tuning=Tuning(256, 2, 0))
    return x[:2].tolist()


def half_sum(rank: int, world: int, p: int) -> dict[str, float]:
    """Rank 0 holds a value whose half-precision spacing is 2, every other rank holds 1:
    a half-precision add of big + 1 rounds back to big, so only a float32 accumulator
    reaches the exact sum big + (p - 1) (representable when p - 1 is even)."""
    out = {}
    for dtype, big in (("float16", 2048.0), ("bfloat16", 256.0)):
        x = torch.tensor([big if rank == 0 else 1.0], dtype=DTYPES[dtype])
        all_reduce(x, algorithm="tree")
        out[dtype] = float(x.item())
    return out


def topology_groups(rank: int, world: int, ep_size: int, cp_size: int = 1) -> dict:
    """The ranks of each named group of the mesh this rank belongs to, an all-reduce over each,
    and which communicators the mesh hands a parallelized model."""
    import torch.distributed as dist

    from parallel.mesh import MeshShape, Topology

    topo = Topology.build(MeshShape(world, ep=ep_size, cp=cp_size))
    names = ("dp", "ep", "expert_dp") + (("cp",) if cp_size > 1 else ())
    out = {"sizes": {n: topo.size(n) for n in names}, "ep_rank": topo.rank_in("ep"),
           "data": (topo.data_rank, topo.data_size),
           "instances": {n: topo.instances(n) for n in names}}
    for name in names:
        g = topo.group(name)
        out[name] = dist.get_process_group_ranks(g)
        t = torch.tensor([float(rank)])
        dist.all_reduce(t, group=g)
        out[name + "_sum"] = t.item()
    groups = [topo.group(n) for n in names]
    out["distinct_groups"] = len({id(g) for g in groups}) == len(groups)
    comms = topo.communicators(algorithm="ring")
    out["communicators"] = sorted(k for k in ("dp", "cp", "ep", "expert_dp") if getattr(comms, k) is not None)
    comms.close()
    return out


def inter_node_bytes(rank: int, world: int, node_of: list[int], algorithm: str, op: str, n: int) -> dict:
    """One collective of n float32 elements through layout_comm; this rank's byte counters."""
    comm = layout_comm(world, tuple(node_of), algorithm)
    comm.tuning = Tuning()  # the default segments (earlier cases may have left others): one chunk here
    comm.stats.reset()
    b = split_bounds(n, world)
    x = rank_input(7, rank, n, "float32")
    if op == "all_reduce":
        comm.all_reduce(x)
    elif op == "reduce_scatter":
        comm.reduce_scatter(torch.empty(b[rank + 1] - b[rank]), x)
    else:
        comm.all_gather(torch.empty(n), x[b[rank]:b[rank + 1]])
    return {"bytes_sent": comm.stats.bytes_sent, "inter_node_bytes": comm.stats.inter_node_bytes}


def discovered_layout(rank: int, world: int, node_env: list[str] | None, group_rank: list[str] | None) -> list[int]:
    """discover_layout() with RINGTRAIN_NODE or torchrun's GROUP_RANK set per rank as given."""
    import os

    from parallel.collectives import discover_layout
    saved = {k: os.environ.get(k) for k in ("RINGTRAIN_NODE", "GROUP_RANK", "TORCHELASTIC_RUN_ID")}
    try:
        for k in saved:
            os.environ.pop(k, None)
        if node_env is not None:
            os.environ["RINGTRAIN_NODE"] = node_env[rank]
        if group_rank is not None:
            os.environ["GROUP_RANK"] = group_rank[rank]
            os.environ["TORCHELASTIC_RUN_ID"] = "test"
        return list(discover_layout().node_of)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def hier_refusals(rank: int, world: int) -> dict[str, str]:
    """The messages of hier on an uneven layout, for a Communicator and for a Topology."""
    from parallel.mesh import MeshShape, Topology
    out = {}
    uneven = NodeLayout(tuple([0] * (world - 1) + [1]))
    try:
        Communicator(algorithm="hier", layout=uneven)
    except ValueError as e:
        out["communicator"] = str(e)
    topo = Topology.build(MeshShape(world), layout=uneven)
    try:
        topo.communicators(algorithm="hier")
    except ValueError as e:
        out["topology"] = str(e)
    return out


def auto_choices(rank: int, world: int, table: dict, sizes: list[int], dtype: str) -> dict:
    """A Communicator(algorithm="auto") over `table` (a tuning file's JSON): per size, the
    algorithm it names, the one that actually ran (from its trace) and the result."""
    from parallel.collectives import TuningTable
    import json
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(table, f)
    comm = Communicator(algorithm="auto", table=TuningTable.load(f.name))
    ran = []
    comm.tracer = lambda span: ran.append(span.algorithm)
    out = {"named": [], "ran": ran, "results": []}
    for i, n in enumerate(sizes):
        x = rank_input(50 + i, rank, n, dtype)
        out["named"].append(comm.algorithm_for("all_reduce", x.numel() * x.element_size(), x.dtype))
        comm.all_reduce(x)
        out["results"].append(x)
    comm.close()
    return out
