"""The model's features: per (op, algorithm, nodes, ranks per node, bytes) the latency steps,
the bytes on the busiest link of each level and the bytes reduced, derived from each
algorithm's schedule (the formulas and assumptions: this package's docstring)."""

from __future__ import annotations

import math
from collections import Counter
from typing import NamedTuple

import numpy as np

from ...collectives.registry import Tuning

PARAMS = ("alpha_intra", "alpha_inter", "beta_intra", "beta_inter", "gamma")
FEATURES = ("a_intra", "a_inter", "b_intra", "b_inter", "g")
OPS = ("all_reduce", "reduce_scatter", "all_gather", "all_to_all", "broadcast")
ALGORITHMS = ("ring", "rhd", "tree", "native", "hier", "auto")
MODELLED: dict[str, tuple[str, ...]] = {
    "ring": OPS,
    "native": OPS,
    "rhd": ("all_reduce",),
    "tree": ("all_reduce", "broadcast"),
    "hier": ("all_reduce", "reduce_scatter", "all_gather"),
}
REDUCING = ("all_reduce", "reduce_scatter")
FORMAT = "ringtrain-costmodel/1"
ELEMENT_SIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8, "int32": 4, "int64": 8,
                "int8": 1, "uint8": 1}
HALF_DTYPES = ("float16", "bfloat16")
HIER_SMALL_PIECE_BYTES = 64 << 10
"""hier.py's SMALL_PIECE_BYTES: inter-node pieces below it go by rhd (a test keeps them equal)."""
DEFAULT_TUNING = Tuning()
NOMINAL = (20e-6, 100e-6, 1 / 2e9, 1 / 0.125e9, 1 / 4e9)
"""Parameters used only to pick the tree broadcast's critical path (see the module doc)."""
REQUIRED_COLUMNS = ("op", "algorithm", "world_size", "size_bytes", "time_us")


class Undetermined(ValueError):
    """A prediction needs parameters that the fitting data did not determine."""


class Features(NamedTuple):
    """Latency steps, bytes on the busiest link, and bytes reduced, per level (module doc)."""

    a_intra: float = 0.0
    a_inter: float = 0.0
    b_intra: float = 0.0
    b_inter: float = 0.0
    g: float = 0.0

    def as_array(self) -> np.ndarray:
        return np.array(self, dtype=float)


# -- features ---------------------------------------------------------------------------------

class _Acc:
    """Sums step charges (rules R1-R3)."""

    def __init__(self):
        self.v = [0.0] * 5

    def charge(self, flows, nbytes: float, per_node: int, nics: int, copies: int = 1) -> None:
        """One step: messages (src, dst) of `nbytes` each, in flight together; `copies` identical
        instances of the step run at once on the same nodes (hier's P inter-node groups)."""
        out, inn = Counter(), Counter()
        for s, d in flows:
            if s // per_node != d // per_node:
                out[s // per_node] += 1
                inn[d // per_node] += 1
        if out:
            k = max(max(out.values()), max(inn.values())) * copies
            self.v[1] += 1
            self.v[3] += math.ceil(k / nics) * nbytes
            return
        ports_out, ports_in = Counter(s for s, _ in flows), Counter(d for _, d in flows)
        if not ports_out:
            return
        k = max(max(ports_out.values()), max(ports_in.values()))
        self.v[0] += 1
        self.v[2] += k * nbytes

    def features(self) -> Features:
        return Features(*self.v)


def _fold(p: int) -> tuple[int, int]:
    pof2 = 1 << (p.bit_length() - 1)
    return pof2, p - pof2


def _real(v: int, q: int) -> int:
    return 2 * v + 1 if v < q else v + q


def _rhd(p: int, per_node: int, nbytes: float, nics: int, copies: int = 1) -> Features:
    acc, (pof2, q), g = _Acc(), _fold(p), 0.0
    if p == 1:
        return Features()
    if q:
        acc.charge([(2 * i, 2 * i + 1) for i in range(q)], nbytes, per_node, nics, copies)
        g += nbytes
    masks = []
    m = pof2 >> 1
    while m:
        masks.append(m)
        m >>= 1
    for m in masks:
        acc.charge([(_real(v, q), _real(v ^ m, q)) for v in range(pof2)], m * nbytes / pof2, per_node, nics, copies)
        g += m * nbytes / pof2
    for m in reversed(masks):
        acc.charge([(_real(v, q), _real(v ^ m, q)) for v in range(pof2)], m * nbytes / pof2, per_node, nics, copies)
    if q:
        acc.charge([(2 * i + 1, 2 * i) for i in range(q)], nbytes, per_node, nics, copies)
    return acc.features()._replace(g=g)


def _tree_all_reduce(p: int, per_node: int, nbytes: float, nics: int) -> Features:
    acc, (pof2, q), g = _Acc(), _fold(p), 0.0
    if p == 1:
        return Features()
    if q:
        acc.charge([(2 * i, 2 * i + 1) for i in range(q)], nbytes, per_node, nics)
        g += nbytes
    m = 1
    while m < pof2:
        acc.charge([(_real(v, q), _real(v ^ m, q)) for v in range(pof2)], nbytes, per_node, nics)
        g += nbytes
        m <<= 1
    if q:
        acc.charge([(2 * i + 1, 2 * i) for i in range(q)], nbytes, per_node, nics)
    return acc.features()._replace(g=g)


def _tree_broadcast(p: int, per_node: int, nbytes: float, nics: int) -> Features:
    if p == 1:
        return Features()
    children: dict[int, list[int]] = {}
    for v in range(1, p):
        children.setdefault(v - (v & -v), []).append(v)
    path = {0: np.zeros(5)}
    weights = np.array(NOMINAL)
    for v in range(1, p):  # a parent is always a smaller rank
        u = v - (v & -v)
        kids = children[u]
        hop = np.zeros(5)
        if u // per_node != v // per_node:
            e = sum(1 for c in kids if c // per_node != u // per_node)
            hop[1], hop[3] = 1, math.ceil(e / nics) * nbytes
        else:
            i = sum(1 for c in kids if c // per_node == u // per_node)
            hop[0], hop[2] = 1, i * nbytes
        path[v] = path[u] + hop
    last = max(range(1, p), key=lambda v: (float(weights @ path[v]), -v))
    return Features(*path[last])


def segment_count(nbytes: float, element_size: int, tuning: Tuning = DEFAULT_TUNING) -> int:
    """pipeline.segment_count for a buffer of `nbytes` (the broadcast chain's segments)."""
    nbytes = int(nbytes)
    elems = max(nbytes // max(element_size, 1), 1)
    want = -(-nbytes // tuning.segment_bytes)
    if nbytes >= 2 * tuning.min_split_bytes:
        want = max(2, want)
    return max(1, min(elems, want))


def _chain_broadcast(N: int, P: int, nbytes: float, element_size: int) -> Features:
    p = N * P
    if p == 1 or nbytes <= 0:
        return Features()
    K = segment_count(nbytes, element_size)
    T = p - 2 + K
    T_inter = 0 if N == 1 else min(T, (N - 2) * min(K, P) + K)
    s = nbytes / K
    return Features(T - T_inter, T_inter, (T - T_inter) * s, T_inter * s, 0.0)


def _ring(N: int, P: int, nbytes: float, phases: int, reduces: bool) -> Features:
    p = N * P
    if p == 1:
        return Features()
    steps, piece = phases * (p - 1), nbytes / p
    g = (p - 1) * piece if reduces else 0.0
    if N == 1:
        return Features(steps, 0.0, steps * piece, 0.0, g)
    return Features(0.0, steps, 0.0, steps * piece, g)  # one flow per direction per link (R1, R3)


def _hier(op: str, N: int, P: int, nbytes: float, nics: int) -> Features:
    if N == 1 or P == 1:
        return _ring(N, P, nbytes, 2 if op == "all_reduce" else 1, op in REDUCING)
    phases = 2 if op == "all_reduce" else 1
    a_intra, b_intra = phases * (P - 1), phases * (P - 1) * nbytes / P
    g_intra = (P - 1) * nbytes / P if op in REDUCING else 0.0
    piece = nbytes / P
    if op == "all_reduce" and piece < HIER_SMALL_PIECE_BYTES:
        inter = _rhd(N, 1, piece, nics, copies=P)
    else:
        flow = math.ceil(P / nics) * piece / N
        g_inter = (N - 1) * piece / N if op in REDUCING else 0.0
        inter = Features(0.0, phases * (N - 1), 0.0, phases * (N - 1) * flow, g_inter)
    return Features(a_intra, inter.a_inter, b_intra, inter.b_inter, g_intra + inter.g)


def _all_to_all(N: int, P: int, nbytes: float, nics: int) -> Features:
    p = N * P
    if p == 1:
        return Features()
    piece = nbytes / p
    if N == 1:
        return Features(P - 1, 0.0, (p - 1) * piece, 0.0, 0.0)
    return Features(P - 1, (N - 1) * P, 0.0, math.ceil(P * P * (N - 1) / nics) * piece, 0.0)


def _check_layout(nodes, ranks_per_node) -> tuple[int, int]:
    for name, v in (("nodes", nodes), ("ranks_per_node", ranks_per_node)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    return int(nodes), int(ranks_per_node)


def features(op: str, algorithm: str, nbytes: float, nodes: int, ranks_per_node: int, *,
             dtype: str = "float32", nics: int = 1) -> Features:
    """The model's features for one call (formulas in the module docstring).

    nbytes is the row's size_bytes; nodes x ranks_per_node the layout (node-major ranks);
    dtype matters for tree all-reduce (half types travel as float32) and the broadcast chain's
    segment count; nics is the number of links per node (1 on the emulated cluster)."""
    if op not in OPS:
        raise ValueError(f"op must be one of {list(OPS)}, got {op!r}")
    if algorithm == "auto":
        raise ValueError("auto has no features of its own: it is predicted as the fastest of the "
                         "other algorithms (CostModel.predict)")
    if algorithm not in MODELLED:
        raise ValueError(f"algorithm must be one of {list(ALGORITHMS)}, got {algorithm!r}")
    if op not in MODELLED[algorithm]:
        raise ValueError(f"no model for {algorithm} {op}: {algorithm} has {', '.join(MODELLED[algorithm])}")
    N, P = _check_layout(nodes, ranks_per_node)
    if not (isinstance(nics, (int, np.integer)) and nics >= 1):
        raise ValueError(f"nics must be an integer >= 1, got {nics!r}")
    if dtype not in ELEMENT_SIZE:
        raise ValueError(f"dtype must be one of {list(ELEMENT_SIZE)}, got {dtype!r}")
    n = float(nbytes)
    if not n >= 0:
        raise ValueError(f"nbytes must be >= 0, got {nbytes!r}")
    if algorithm == "hier":
        return _hier(op, N, P, n, nics)
    if algorithm == "rhd":
        return _rhd(N * P, P, n, nics)
    if algorithm == "tree" and op == "all_reduce":
        return _tree_all_reduce(N * P, P, 2 * n if dtype in HALF_DTYPES else n, nics)
    if algorithm == "tree":
        return _tree_broadcast(N * P, P, n, nics)
    # ring, and native assumed ring-like
    if op == "all_reduce":
        return _ring(N, P, n, 2, True)
    if op == "reduce_scatter":
        return _ring(N, P, n, 1, True)
    if op == "all_gather":
        return _ring(N, P, n, 1, False)
    if op == "all_to_all":
        return _all_to_all(N, P, n, nics)
    return _chain_broadcast(N, P, n, ELEMENT_SIZE[dtype])
