"""A calibrated alpha-beta-gamma cost model of ringtrain's collectives on N nodes x P ranks.

    python -m parallel.bench.costmodel --fit A/results.csv [B/results.csv ...] \\
        --check C/results.csv [D/results.csv ...] [--save params.json] [--params params.json] \\
        [--ops all_reduce,...] [--algorithms ring,hier,...] [--min-bytes 64K]
    python -m parallel.bench.costmodel --paper

For every (algorithm, op) one time prediction, linear in five parameters:

    t = alpha_intra a_intra + alpha_inter a_inter + beta_intra b_intra + beta_inter b_inter + gamma g

alpha_* are seconds per latency step, beta_* seconds per byte on one link, gamma seconds per
byte reduced. The features a_*, b_*, g come analytically from (op, algorithm, N, P, n) by
following each algorithm's schedule in parallel/collectives/ (`features`); the parameters are
fitted per (algorithm, op) from the benchmark's results.csv (`CostModel.fit`). The layout of a
results.csv row comes from its nodes / ranks_per_node columns, else from meta.nodes /
meta.ranks_per_node of the results.json beside it, else one node of world_size ranks; rows of an
uneven layout, with wrong > 0, or of a world of one are left out with a note. docs/costmodel.md
has the CLI, the validation procedure and the table on published H100 figures (--paper).

Notation
--------
N nodes, P ranks per node, p = N P, ranks node-major (rank r lives on node r // P, which is
torchrun's order and `NodeLayout.regular`). n = the row's `size_bytes`: the whole buffer of
an all-reduce or broadcast, the input of a reduce-scatter, the output of an all-gather, one
rank's input of an all-to-all. L = links per node (`nics`): 1 on the emulated cluster, where
every node has one shaped link to a switch; the paper table uses L = 8 (one InfiniBand NIC per
GPU). ceil = rounding up. Pieces are taken as n/p exactly (split_bounds differs by one element).

How a step is charged (the rules every formula below follows)
-------------------------------------------------------------
R1 A step is a set of messages in flight together, each of s bytes. If any of them goes
   between nodes it is an inter-node step: a_inter += 1 and b_inter += ceil(k / L) s, where k
   is the largest number of the step's messages that leave one node, or enter one node (the
   flows sharing that node's link in one direction; the link is full duplex). Concurrent flows
   are spread over the L links, so ceil(k / L) of them share the busiest one.
R2 A step with intra-node messages only: a_intra += 1 and b_intra += k s, k the most messages
   one rank sends or receives in it (each rank has its own port: loopback connection, NVLink).
R3 Lock-step: a step costs its slowest hop. A step with both intra- and inter-node messages
   is charged to the inter level only. This assumes the inter-node hop is the slower one
   (alpha_inter >= alpha_intra and a flow's inter-node bandwidth <= its intra-node one), true
   on the emulated cluster (a shaped link against loopback) and for InfiniBand against NVLink.
R4 g = bytes one rank combines on the critical path. Reductions are added to the transfer
   time, not overlapped with it (the pipeline window overlaps them in part; gamma absorbs it).
R5 Segmentation is ignored (one message per step) except for the broadcast chain, where it
   changes the shape of the cost (n instead of (p - 1) n). For the others the extra
   per-segment latency grows with n, so it is carried by the fitted beta; pieces under
   2 x 64 KiB travel whole anyway.
R6 Local copies (the hierarchical reduce-scatter's permuted input, the all-to-all's own
   piece) are not counted. A world of one moves nothing: every feature is 0.

Features per (op, algorithm)
----------------------------
ring all_reduce (ring.py: reduce-scatter then all-gather as one stream): S = 2(p-1) steps of
    n/p. One node: a_intra = S, b_intra = S n/p. Several nodes: in every step each node's last
    rank sends to the next node's first rank, so each link carries one flow per direction and
    by R3 every step is inter-node: a_inter = S, b_inter = S ceil(1/L) n/p = S n/p.
    g = (p-1) n/p.
ring reduce_scatter: the same with S = p - 1; g = (p-1) n/p.
ring all_gather: S = p - 1; g = 0.
hier all_reduce (hier.py): intra-node ring reduce-scatter over P, inter-node all-reduce of
    each rank's n/P piece among the N ranks with its local index (P such all-reduces at once,
    sharing every node's link), intra-node ring all-gather.
        a_intra = 2(P-1), b_intra = 2(P-1) n/P
        inter by ring (pieces n/P >= 64 KiB): a_inter = 2(N-1), b_inter = 2(N-1) ceil(P/L) n/(N P)
        inter by rhd (pieces < 64 KiB, hier.SMALL_PIECE_BYTES): rhd's steps (below) on N ranks,
            one per node, of n/P bytes, each step's flow count multiplied by P
        g = (P-1) n/P + (N-1) n/(N P) = (p-1) n/p  (rhd inter phase: (P-1) n/P + rhd's g of n/P)
    N = 1 or P = 1: the flat ring (hier.py falls back to it), so its features are ring's.
hier reduce_scatter: intra ring reduce-scatter of the node's N-piece chunks then inter ring
    reduce-scatter: a_intra = P-1, b_intra = (P-1) n/P, a_inter = N-1,
    b_inter = (N-1) ceil(P/L) n/(N P), g = (P-1) n/P + (N-1) n/(N P).
hier all_gather: the reverse (inter ring all-gather of the n/(N P) pieces, then intra ring
    all-gather): the same a and b as reduce_scatter, g = 0.
rhd all_reduce (rhd.py): p' = largest power of two <= p, q = p - p'. Steps, each charged by
    R1-R3 from its actual pairs (real rank of virtual rank v: 2v+1 if v < q, else v + q):
        fold-in (q > 0): ranks 2i -> 2i+1, i < q, n bytes; g += n
        halving, mask m = p'/2, p'/4 ... 1: v <-> v^m both ways, m n/p' bytes; g += m n/p'
        doubling: the same masks in reverse, no reduction
        fold-out (q > 0): 2i+1 -> 2i, n bytes
    so g = [q>0] n + (p'-1) n/p'. With N and P powers of two (no fold) masks >= P pair every
    rank with one on another node, all P ranks of a node with the same node: a_inter = 2 lg N,
    b_inter = 2 ceil(P/L) (N-1) n/N, a_intra = 2 lg P, b_intra = 2 (P-1) n/p.
tree all_reduce (tree.py, recursive doubling): w = n, or 2 n for float16/bfloat16 (the whole
    reduction runs in float32). fold-in (q > 0, w bytes, g += w); masks 1, 2, ... p'/2: v <-> v^m,
    w bytes, g += w; fold-out (w bytes). g = ([q>0] + lg p') w. Charged by R1-R3; with N and P
    powers of two: a_intra = lg P, b_intra = lg P w, a_inter = lg N, b_inter = lg N ceil(P/L) w.
tree broadcast (binomial tree from rank 0, as the benchmark calls it): rank v gets the data
    from v - lowbit(v), then posts all its sends (to v + 2^j < p for 2^j < lowbit(v); the root:
    every 2^j < p) at once, so
    they share its port / its node's link. A hop u -> c costs a_inter 1 and
    b_inter ceil(e_u/L) n if c is on another node (e_u = u's children on other nodes), else
    a_intra 1 and b_intra i_u n (i_u = u's children on u's node). The features are those of the
    path from 0 to the rank that finishes last under nominal parameters (NOMINAL: the
    emulated cluster's order of magnitude), so they stay parameter-free. Other ranks of a node
    sending at the same moment are not counted (with P a power of two only local rank 0
    sends off its node).
ring / native broadcast (ring.py: a pipelined chain 0 -> 1 -> ... -> p-1): K = segments, as
    pipeline.segment_count at the default Tuning (about 4 MiB each, at least 2 once
    n >= 128 KiB); T = p - 2 + K stages of n/K (stage t moves segment j over hop t - j). The
    chain's inter-node hops are P-1, 2P-1, ..., (N-1)P-1 and a stage with any of them active is
    inter-node: T_inter = (N-2) min(K, P) + K (N > 1, else 0). a_inter = T_inter,
    b_inter = T_inter n/K, a_intra = T - T_inter, b_intra = (T - T_inter) n/K, g = 0.
all_to_all (ring = alltoall.py's pairwise exchange, and native): every rank posts its p-1
    pieces of n/p at once. a_intra = P-1, a_inter = (N-1) P (one message per peer, posted
    back to back by one thread). b_inter = ceil(P^2 (N-1) / L) n/p (every rank of a node sends
    (N-1) P pieces over the node's link). b_intra = (p-1) n/p on one node, else 0 (the intra
    pieces travel while the slower link is busy, R3). g = 0.
native (torch.distributed's own, gloo on these machines): ASSUMED ring-like for every op, so
    its features are ring's (broadcast: the pipelined chain; all_to_all: pairwise). gloo's
    real schedule is the backend's; the per-(algorithm, op) fit absorbs constant differences,
    not differently shaped ones.
auto: no features of its own. `predict` returns the minimum over the other algorithms'
    predictions for the op (auto picks one of them per size).

Fitting
-------
Per (algorithm, op), rows X (features) and y (measured seconds): non-negative least squares on
relative error, min ||(X theta - y) / y|| over theta >= 0 (rows weighted by 1/measured, so
small messages count as much as large ones), solved by Lawson-Hanson's active-set method
(`nnls`, numpy only) on columns scaled to unit maximum. Which parameters the data determine:
  undetermined  its feature is 0 in every fitting row (alpha_inter and beta_inter when every
                row is on one node; gamma for ops that reduce nothing). Stored as null.
  confounded    its column is a linear combination of the others' (ring all-reduce always
                has b = 2 g, so gamma cannot be told apart from beta). Set to 0; the
                parameters it is confounded with carry its cost, which is exact for every
                query whose features keep the same relation.
A prediction is made only where it is estimable: the query's (scaled) features must lie in
the row space of the fitting features, so it uses only combinations the data determined.
Otherwise `predict` raises `Undetermined`, naming the parameters it would need and the layouts
the fit saw. It never treats an undetermined parameter as zero.

Limits worth knowing when reading a check: every emulated node shares the machine's 2 CPU
cores with the others, so intra-node copies and reductions slow down as N grows, which the
per-rank features do not express (beta_intra and gamma fitted at one N are optimistic at a
larger N); P flows sharing a shaped link are assumed to share it perfectly; fold and tree
steps in which only some ranks work still cost a whole step.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, NamedTuple

import numpy as np

from ..collectives.registry import Tuning
from .config import parse_bytes

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


# -- non-negative least squares ----------------------------------------------------------------

def nnls(A, b, max_iter: int | None = None) -> np.ndarray:
    """argmin ||A x - b|| subject to x >= 0 (Lawson and Hanson's active-set method)."""
    A, b = np.asarray(A, float), np.asarray(b, float)
    m, n = A.shape
    x = np.zeros(n)
    passive = np.zeros(n, bool)  # the set of variables free to be > 0
    barred = np.zeros(n, bool)  # could not enter for round-off; offered again once x moves
    tol = 10 * np.finfo(float).eps * max(np.linalg.norm(A, 1), 1.0) * max(m, n)
    max_iter = max_iter or 30 * (n + 1)

    def solve(mask):
        z = np.zeros(n)
        if mask.any():
            z[mask] = np.linalg.lstsq(A[:, mask], b, rcond=None)[0]
        return z

    for _ in range(max_iter):
        w = A.T @ (b - A @ x)
        free = ~passive & ~barred
        if not free.any() or not (w[free] > tol).any():
            return x
        j = int(np.argmax(np.where(free, w, -np.inf)))
        passive[j] = True
        z = solve(passive)
        if z[j] <= 0:  # the gradient says j should enter, the solve disagrees: round-off
            passive[j], barred[j] = False, True
            continue
        for _ in range(max_iter):
            neg = passive & (z <= 0)
            if not neg.any():
                break
            ratios = x[neg] / (x[neg] - z[neg])
            k = np.flatnonzero(neg)[int(np.argmin(ratios))]
            x = x + float(ratios.min()) * (z - x)
            x[k] = 0.0
            passive &= x > 0
            x[~passive] = 0.0
            z = solve(passive)
        else:
            raise RuntimeError("nnls: the inner loop did not converge")
        x = z
        barred[:] = False
    raise RuntimeError("nnls did not converge")


# -- measurements ------------------------------------------------------------------------------

class InputError(ValueError):
    """Bad input to the CLI: the message names the argument (and file)."""


class UnevenLayout(ValueError):
    """A row whose nodes hold different numbers of ranks: no node-major N x P to model."""


@dataclass(frozen=True)
class Measurement:
    """One results.csv row, as the model reads it."""

    op: str
    algorithm: str
    nodes: int
    ranks_per_node: int
    size_bytes: int
    seconds: float
    dtype: str = "float32"
    source: str = ""

    @property
    def layout(self) -> str:
        return f"{self.nodes}x{self.ranks_per_node}"

    @property
    def world_size(self) -> int:
        return self.nodes * self.ranks_per_node

    @classmethod
    def from_mapping(cls, d: Mapping, source: str = "") -> "Measurement":
        """From a results.csv row (strings) or a dict with the same keys; a row without nodes /
        ranks_per_node is one node of world_size ranks."""
        world = int(d["world_size"])
        nodes = d.get("nodes")
        nodes = 1 if nodes in (None, "") else int(nodes)
        if "ranks_per_node" not in d:  # a file from before the layout columns: one node
            if world % nodes:
                raise UnevenLayout(f"world_size {world} is not a multiple of nodes {nodes}")
            rpn = world // nodes
        elif d["ranks_per_node"] in (None, ""):
            raise UnevenLayout(f"{nodes} nodes holding different numbers of the {world} ranks")
        else:
            rpn = int(d["ranks_per_node"])
        if nodes * rpn != world:
            raise ValueError(f"nodes {nodes} x ranks_per_node {rpn} != world_size {world}")
        op = str(d["op"])
        if op not in OPS:
            raise ValueError(f"unknown op {op!r} (ops: {', '.join(OPS)})")
        return cls(op, str(d["algorithm"]), nodes, rpn, int(float(d["size_bytes"])),
                   float(d["time_us"]) * 1e-6, str(d.get("dtype") or "float32"), source)


def _json_layout(csv_path: Path) -> tuple[dict | None, str | None]:
    """The layout in results.json's meta beside a results.csv without layout columns:
    ({"world_size", "nodes", "ranks_per_node"}, note) or (None, note-or-None)."""
    j = csv_path.with_suffix(".json")
    if not j.is_file():
        return None, None
    try:
        meta = json.loads(j.read_text()).get("meta", {})
        layout = {k: meta[k] for k in ("world_size", "nodes", "ranks_per_node")}
    except (OSError, UnicodeDecodeError, ValueError, AttributeError, KeyError, TypeError):
        return None, f"{j}: no layout in its meta; rows of {csv_path} taken as one node"
    return layout, f"{csv_path}: layout {layout['nodes']}x{layout['ranks_per_node']} from {j.name}'s meta"


def read_results(path, arg: str = "--fit") -> tuple[list[Measurement], list[str]]:
    """(measurements, notes) of one results.csv; rows that cannot be used (a wrong result, a
    non-positive time, an uneven layout) are left out with a note. Without nodes /
    ranks_per_node columns the layout comes from results.json's meta beside it, else one node.
    Anything else wrong raises InputError naming `arg` and the file."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{arg} {path}: no such file")
    try:
        with open(p, newline="") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            missing = [c for c in REQUIRED_COLUMNS if c not in header]
            if missing:
                raise InputError(f"{arg} {path}: not a results.csv: missing column(s) {', '.join(missing)}")
            rows, notes, skipped = [], [], Counter()
            layout = None
            if "nodes" not in header and "ranks_per_node" not in header:
                layout, note = _json_layout(p)
                notes += [note] if note else []
            for i, d in enumerate(reader, start=2):
                if layout is not None and str(d.get("world_size")) == str(layout["world_size"]):
                    d = {**d, "nodes": layout["nodes"],
                         "ranks_per_node": "" if layout["ranks_per_node"] is None else layout["ranks_per_node"]}
                try:
                    m = Measurement.from_mapping(d, str(path))
                    wrong = int(float(d.get("wrong") or 0))
                except UnevenLayout:
                    skipped["an uneven layout (the model needs N x P)"] += 1
                    continue
                except (ValueError, TypeError, KeyError) as e:
                    raise InputError(f"{arg} {path}: line {i}: {e}") from None
                if wrong:
                    skipped["a wrong result"] += 1
                elif not m.seconds > 0:
                    skipped["time_us <= 0"] += 1
                else:
                    rows.append(m)
            notes += [f"{path}: left out {c} row(s): {why}" for why, c in skipped.items()]
            return rows, notes
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise InputError(f"{arg} {path}: cannot read it ({e})") from None


# -- the model ---------------------------------------------------------------------------------

@dataclass
class Fit:
    """The fitted parameters of one (algorithm, op)."""

    algorithm: str
    op: str
    params: np.ndarray  # seconds per step / per byte; nan where undetermined
    status: list[str]  # per parameter: fitted | given | confounded | undetermined
    basis: np.ndarray  # orthonormal rows spanning the scaled fitting features
    scale: np.ndarray  # column scale the basis is expressed in
    rows: int = 0
    layouts: dict[str, int] = field(default_factory=dict)
    fit_median_abs_error_pct: float | None = None
    confounded_with: dict[str, list[str]] = field(default_factory=dict)

    def estimable(self, x: np.ndarray) -> bool:
        xs = x / self.scale
        norm = float(np.linalg.norm(xs))
        if norm == 0:
            return True
        res = xs - self.basis.T @ (self.basis @ xs) if len(self.basis) else xs
        return float(np.linalg.norm(res)) <= 1e-6 * norm

    def to_json(self) -> dict:
        nums = lambda a: [None if not math.isfinite(v) else float(v) for v in a]  # noqa: E731
        return {"algorithm": self.algorithm, "op": self.op,
                "params": dict(zip(PARAMS, nums(self.params))), "status": dict(zip(PARAMS, self.status)),
                "confounded_with": self.confounded_with, "rows": self.rows, "layouts": self.layouts,
                "fit_median_abs_error_pct": self.fit_median_abs_error_pct,
                "scale": nums(self.scale), "basis": [nums(r) for r in self.basis]}

    @classmethod
    def from_json(cls, d: dict) -> "Fit":
        params = np.array([np.nan if d["params"][k] is None else float(d["params"][k]) for k in PARAMS])
        basis = np.array([[float(v) for v in r] for r in d["basis"]], dtype=float).reshape(-1, 5)
        return cls(d["algorithm"], d["op"], params, [str(d["status"][k]) for k in PARAMS], basis,
                   np.array([float(v) for v in d["scale"]]), int(d.get("rows", 0)),
                   {str(k): int(v) for k, v in d.get("layouts", {}).items()},
                   d.get("fit_median_abs_error_pct"), dict(d.get("confounded_with", {})))


def _rank(M: np.ndarray) -> int:
    if M.size == 0:
        return 0
    s = np.linalg.svd(M, compute_uv=False)
    return int((s > 1e-9 * s[0]).sum()) if s[0] > 0 else 0


def _fit_group(algorithm: str, op: str, X: np.ndarray, y: np.ndarray, layouts: dict[str, int]) -> Fit:
    A = X / y[:, None]
    scale = np.abs(A).max(axis=0)
    used = scale > 0
    safe = np.where(used, scale, 1.0)
    As = A / safe
    kept: list[int] = []
    for j in range(5):  # alphas, then betas, then gamma: gamma is the one left out when confounded
        if used[j] and _rank(As[:, kept + [j]]) == len(kept) + 1:
            kept.append(j)
    theta = np.full(5, np.nan)
    theta[used] = 0.0
    theta[kept] = nnls(As[:, kept], np.ones(len(y))) / safe[kept]
    status, confounded = [], {}
    for j in range(5):
        if not used[j]:
            status.append("undetermined")
        elif j in kept:
            status.append("fitted")
        else:
            status.append("confounded")
            c = np.linalg.lstsq(As[:, kept], As[:, j], rcond=None)[0]
            confounded[PARAMS[j]] = [PARAMS[kept[i]] for i in range(len(kept)) if abs(c[i]) > 1e-9]
    _, s, vt = np.linalg.svd(As, full_matrices=False)
    basis = vt[: int((s > 1e-9 * s[0]).sum())] if s.size and s[0] > 0 else np.zeros((0, 5))
    pred = X @ np.nan_to_num(theta)
    err = float(np.median(np.abs(pred - y) / y) * 100)
    return Fit(algorithm, op, theta, status, basis, safe, len(y), dict(sorted(layouts.items())), round(err, 3),
               confounded)


class CostModel:
    """Fitted (or given) parameters per (algorithm, op); `predict` in seconds."""

    def __init__(self, fits: Mapping[tuple[str, str], Fit], nics: int = 1, sources: Iterable[str] = (),
                 notes: Iterable[str] = ()):
        self.fits = dict(fits)
        self.nics = int(nics)
        self.sources = list(sources)
        self.notes = list(notes)

    # -- building -----------------------------------------------------------------------------
    @classmethod
    def fit(cls, rows: Iterable, *, nics: int = 1) -> "CostModel":
        """Fits every (algorithm, op) present in `rows` (Measurement objects or results.csv-like
        mappings). auto rows, worlds of one and pairs without a model are left out (see .notes)."""
        groups: dict[tuple[str, str], list[Measurement]] = {}
        sources, skipped = [], Counter()
        for r in rows:
            m = r if isinstance(r, Measurement) else Measurement.from_mapping(r)
            if m.source and m.source not in sources:
                sources.append(m.source)
            if m.algorithm == "auto":
                skipped["auto rows (predicted as the fastest other algorithm, never fitted)"] += 1
            elif m.algorithm not in MODELLED or m.op not in MODELLED[m.algorithm]:
                skipped[f"{m.algorithm} {m.op} rows (no model)"] += 1
            elif m.world_size == 1:
                skipped["rows of a world of one (nothing moves)"] += 1
            elif not m.seconds > 0:
                skipped["rows with time <= 0"] += 1
            else:
                groups.setdefault((m.algorithm, m.op), []).append(m)
        fits = {}
        for (algorithm, op), ms in groups.items():
            X = np.array([features(op, algorithm, m.size_bytes, m.nodes, m.ranks_per_node, dtype=m.dtype,
                                   nics=nics) for m in ms])
            y = np.array([m.seconds for m in ms])
            fits[(algorithm, op)] = _fit_group(algorithm, op, X, y, dict(Counter(m.layout for m in ms)))
        notes = [f"left out {c} {why}" for why, c in skipped.items()]
        return cls(fits, nics, sources, notes)

    @classmethod
    def from_params(cls, params: Mapping[tuple[str, str], Mapping[str, float]], nics: int = 1) -> "CostModel":
        """A model from stated parameters ({(algorithm, op): {"alpha_intra": s, ...}}); a parameter
        left out is undetermined."""
        fits = {}
        for (algorithm, op), ps in params.items():
            unknown = set(ps) - set(PARAMS)
            if unknown:
                raise ValueError(f"unknown parameter(s) {sorted(unknown)}; parameters: {list(PARAMS)}")
            theta = np.array([float(ps[k]) if k in ps else np.nan for k in PARAMS])
            if (theta[np.isfinite(theta)] < 0).any():
                raise ValueError(f"parameters must be >= 0, got {dict(ps)}")
            given = np.isfinite(theta)
            fits[(algorithm, op)] = Fit(algorithm, op, theta, ["given" if g else "undetermined" for g in given],
                                        np.eye(5)[given], np.ones(5))
        return cls(fits, nics)

    @classmethod
    def load(cls, path) -> "CostModel":
        """Reads what `save` wrote; a bad file is a ValueError naming it."""
        try:
            raw = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ValueError(f"{path}: no such file") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: not a readable JSON file ({e})") from None
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise ValueError(f"{path}: not a cost-model parameter file (format must be {FORMAT!r})")
        try:
            fits = [Fit.from_json(d) for d in raw["models"]]
            return cls({(f.algorithm, f.op): f for f in fits}, int(raw.get("nics", 1)), raw.get("sources", []))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}: malformed cost-model file ({type(e).__name__}: {e})") from None

    def save(self, path) -> None:
        """JSON: per (algorithm, op) the parameters (seconds per step / per byte; null where
        undetermined), their status, the rows and layouts they were fitted from."""
        doc = {"format": FORMAT, "units": {"alpha": "seconds per latency step", "beta": "seconds per byte",
                                           "gamma": "seconds per byte reduced"},
               "nics": self.nics, "sources": self.sources,
               "models": [f.to_json() for _, f in sorted(self.fits.items())]}
        Path(path).write_text(json.dumps(doc, indent=1) + "\n")

    # -- using --------------------------------------------------------------------------------
    def features(self, op: str, algorithm: str, nbytes: float, nodes: int, ranks_per_node: int,
                 dtype: str = "float32") -> Features:
        return features(op, algorithm, nbytes, nodes, ranks_per_node, dtype=dtype, nics=self.nics)

    def predict(self, op: str, algorithm: str, nbytes: float, nodes: int, ranks_per_node: int,
                dtype: str = "float32") -> float:
        """Predicted seconds of one call. Raises Undetermined when the fit cannot answer (a
        parameter the query needs was never determined, or no fit for the pair), ValueError on
        a bad argument."""
        if op not in OPS:
            raise ValueError(f"op must be one of {list(OPS)}, got {op!r}")
        if algorithm == "auto":
            return self._predict_auto(op, nbytes, nodes, ranks_per_node, dtype)
        x = self.features(op, algorithm, nbytes, nodes, ranks_per_node, dtype).as_array()
        fit = self.fits.get((algorithm, op))
        if fit is None:
            raise Undetermined(f"no fit for {algorithm} {op}: the fitting data had no such rows")
        if not fit.estimable(x):
            need = [PARAMS[j] for j in range(5) if x[j] != 0 and fit.status[j] not in ("fitted", "given")]
            need = need or [PARAMS[j] for j in range(5) if x[j] != 0]
            parts = []
            for k in need:
                if k in fit.confounded_with:
                    parts.append(f"{k} (confounded with {', '.join(fit.confounded_with[k])} in the fit)")
                else:
                    parts.append(k)
            seen = ", ".join(fit.layouts) if fit.layouts else "none"
            raise Undetermined(f"cannot predict {algorithm} {op} on {nodes}x{ranks_per_node}: it needs "
                               f"{', '.join(parts)}, which the fitting rows (layouts {seen}) do not determine")
        return float(np.nan_to_num(fit.params) @ x)

    def _predict_auto(self, op, nbytes, nodes, ranks_per_node, dtype) -> float:
        best, why = None, []
        for (algorithm, o) in sorted(self.fits):
            if o != op or algorithm == "auto":
                continue
            try:
                t = self.predict(op, algorithm, nbytes, nodes, ranks_per_node, dtype)
            except Undetermined as e:
                why.append(str(e))
                continue
            best = t if best is None else min(best, t)
        if best is None:
            raise Undetermined(f"cannot predict auto {op} on {nodes}x{ranks_per_node}: no other algorithm "
                               f"can be predicted there" + (f" ({'; '.join(why)})" if why else ""))
        return best

    def summary(self) -> str:
        """The parameters as a table: alpha in us, beta and gamma as GB/s (1 / value)."""
        def show(f: Fit, j: int) -> str:
            st = f.status[j]
            if st == "undetermined":
                return "n/a" if (j == 4 and f.op not in REDUCING) else "undetermined"
            if st == "confounded":
                return "confounded"
            v = f.params[j]
            if j < 2:
                return f"{v * 1e6:.2f} us"
            return "inf GB/s" if v == 0 else f"{1 / v / 1e9:.4g} GB/s"
        head = (f"#{'algorithm':>9} {'op':>14} {'rows':>5} {'layouts':>16} " +
                " ".join(f"{k:>13}" for k in PARAMS) + f" {'fit err':>8}")
        lines = [f"# cost model ({len(self.fits)} algorithm/op pairs, links per node {self.nics}); "
                 f"alpha per step, beta and gamma as GB/s = 1/value", head]
        for (algorithm, op), f in sorted(self.fits.items()):
            err = "-" if f.fit_median_abs_error_pct is None else f"{f.fit_median_abs_error_pct:.1f}%"
            lays = ",".join(f.layouts) or "-"
            lines.append(f" {algorithm:>9} {op:>14} {f.rows:>5} {lays:>16} " +
                         " ".join(f"{show(f, j):>13}" for j in range(5)) + f" {err:>8}")
            for k, others in f.confounded_with.items():
                lines.append(f"#   {algorithm} {op}: {k} is confounded with {', '.join(others)} in this data "
                             f"(set to 0; they carry its cost)")
        return "\n".join(lines)


# -- the paper table ---------------------------------------------------------------------------

PAPER_GPUS_PER_NODE = 8
PAPER_NVLINK_BUSBW = 370e9
"""NCCL ring busbw on one 8 x H100 NVLink node (NVIDIA/nccl-tests issue #212, S. Jeaugey:
450 GB/s line rate, ~370 GB/s effective with NCCL_ALGO=RING)."""
PAPER_NICS = 8
PAPER_NIC_BW = 48e9
"""One 400 Gb/s NDR NIC (NVIDIA/nccl-tests issue #290: "46-48 GB/s per NIC"); 8 per node."""
PAPER_ALPHA_INTRA = 3.4e-6
PAPER_ALPHA_INTER = 9.6e-6
"""Per-hop latencies of NCCL's own tuning model for ring / Simple protocol: NVLink 3.4 us,
network 9.6 us (hwLat in NVIDIA/nccl src/graph/tuning.cc, the stored version)."""
PAPER_BYTES = 8 << 30
PAPER_NODES = (1, 2, 4, 16, 64)
PAPER_PUBLISHED = {
    1: "~480 NVLS, ~370 ring [b]",
    2: "~470 [a]; ~430 [c]",
    4: "~366 [a]; ~320 [c]",
}
PAPER_SOURCES = (
    "[a] NVIDIA/nccl-tests issue #309 (8 x H100, 8 x 400G): the figures reported there; the thread could not "
    "be re-read for this table, so they are unverified here",
    "[b] NVIDIA/nccl-tests issue #212 (S. Jeaugey): one 8 x H100 node, ~370 GB/s with NCCL_ALGO=RING, "
    "~480 GB/s peak with NVLink SHARP (the default)",
    "[c] NVIDIA/nccl issue #1221 (8 x H100, 8 x 400G RoCE, NCCL 2.19.3, 4-8 GB): ~430 GB/s on 1-2 nodes with "
    "NVLS (330 without), ~320 GB/s on 4 nodes with or without",
)


def paper_model() -> CostModel:
    """ring and hier all-reduce fed with the published link figures above (gamma = 0: a GPU
    reduces at HBM speed inside the copy kernel)."""
    ps = {"alpha_intra": PAPER_ALPHA_INTRA, "alpha_inter": PAPER_ALPHA_INTER,
          "beta_intra": 1 / PAPER_NVLINK_BUSBW, "beta_inter": 1 / PAPER_NIC_BW, "gamma": 0.0}
    return CostModel.from_params({("ring", "all_reduce"): ps, ("hier", "all_reduce"): ps}, nics=PAPER_NICS)


def paper_rows(nbytes: int = PAPER_BYTES, nodes: Iterable[int] = PAPER_NODES) -> list[dict]:
    """Predicted all-reduce busbw (GB/s, nccl-tests' definition: size / time x 2(p-1)/p) of the
    flat ring and hier, and hier's bound if its intra- and inter-node phases overlapped
    perfectly (time = the larger level's share instead of the sum)."""
    model, out = paper_model(), []
    P = PAPER_GPUS_PER_NODE
    for N in nodes:
        p = N * P
        factor = 2 * (p - 1) / p
        row = {"nodes": N, "gpus": p}
        for algorithm in ("ring", "hier"):
            t = model.predict("all_reduce", algorithm, nbytes, N, P)
            row[algorithm] = nbytes / t / 1e9 * factor
        x = model.features("all_reduce", "hier", nbytes, N, P).as_array()
        theta = np.nan_to_num(model.fits[("hier", "all_reduce")].params)
        intra, inter = theta[[0, 2]] @ x[[0, 2]], theta[[1, 3]] @ x[[1, 3]]
        row["hier_overlapped"] = nbytes / (max(intra, inter) + theta[4] * x[4]) / 1e9 * factor
        row["published"] = PAPER_PUBLISHED.get(N, "-")
        out.append(row)
    return out


def paper_table(nbytes: int = PAPER_BYTES) -> str:
    lines = [f"# all-reduce busbw (GB/s) of {nbytes / (1 << 30):g} GiB on N nodes x {PAPER_GPUS_PER_NODE} H100, "
             f"predicted from published link figures:",
             f"# NVLink ring busbw {PAPER_NVLINK_BUSBW / 1e9:g} GB/s per GPU, {PAPER_NICS} NICs x "
             f"{PAPER_NIC_BW / 1e9:g} GB/s per node (a flow uses one NIC), alpha {PAPER_ALPHA_INTRA * 1e6:g} us "
             f"intra / {PAPER_ALPHA_INTER * 1e6:g} us inter per step, gamma 0",
             "| nodes | GPUs | model: flat ring | model: hier, levels one after another | model: hier, levels pipelined "
             "| published nccl-tests busbw (NCCL's own algorithm choice) |",
             "|---:|---:|---:|---:|---:|---|"]
    for r in paper_rows(nbytes):
        lines.append(f"| {r['nodes']} | {r['gpus']} | {r['ring']:.1f} | {r['hier']:.1f} | "
                     f"{r['hier_overlapped']:.1f} | {r['published']} |")
    lines += [f"# {s}" for s in PAPER_SOURCES]
    return "\n".join(lines)


# -- CLI ---------------------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2
        self.exit(2, f"costmodel: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="python -m parallel.bench.costmodel",
                 description="Fit the alpha-beta-gamma cost model to results.csv files and check it on others.")
    ap.add_argument("--fit", nargs="+", metavar="CSV", help="results.csv files to fit the parameters on")
    ap.add_argument("--check", nargs="+", metavar="CSV", help="results.csv files to predict and compare")
    ap.add_argument("--save", metavar="JSON", help="write the fitted parameters here")
    ap.add_argument("--params", metavar="JSON", help="load parameters written by --save instead of fitting")
    ap.add_argument("--ops", help="comma list: only these ops (default all)")
    ap.add_argument("--algorithms", help="comma list: only these algorithms (default all)")
    ap.add_argument("--min-bytes", default="0", help="leave out rows smaller than this (K/M/G binary), default 0")
    ap.add_argument("--paper", action="store_true",
                    help="print the all-reduce busbw table predicted from published H100 / NDR figures")
    return ap


def _choices(flag: str, value: str | None, allowed) -> set[str] | None:
    if value is None:
        return None
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise InputError(f"{flag} is empty; choose from {', '.join(allowed)}")
    for v in items:
        if v not in allowed:
            raise InputError(f"{flag}: unknown {flag.strip('-').rstrip('s')} {v!r}; choose from {', '.join(allowed)}")
    return set(items)


def _load_rows(paths, flag, ops, algorithms, min_bytes) -> tuple[list[Measurement], list[str]]:
    rows, notes = [], []
    for path in paths:
        got, why = read_results(path, flag)
        notes += why
        rows += [m for m in got if (ops is None or m.op in ops) and (algorithms is None or m.algorithm in algorithms)
                 and m.size_bytes >= min_bytes]
    return rows, notes


def _check(model: CostModel, rows: list[Measurement]) -> tuple[list[str], bool]:
    lines = [f"#{'op':>14} {'algorithm':>9} {'layout':>7} {'size_B':>12} {'measured_us':>12} "
             f"{'predicted_us':>13} {'error':>8}"]
    done, refused, skipped = [], Counter(), 0
    for m in rows:
        if m.world_size == 1:
            skipped += 1
            continue
        try:
            t = model.predict(m.op, m.algorithm, m.size_bytes, m.nodes, m.ranks_per_node, m.dtype)
        except Undetermined as e:
            refused[(m.algorithm, m.op, m.layout, str(e))] += 1
            continue
        except ValueError as e:  # an algorithm / op pair the model has no formula for
            refused[(m.algorithm, m.op, m.layout, str(e))] += 1
            continue
        err = (t - m.seconds) / m.seconds * 100
        done.append((m, t, err))
        lines.append(f" {m.op:>14} {m.algorithm:>9} {m.layout:>7} {m.size_bytes:>12} {m.seconds * 1e6:>12.1f} "
                     f"{t * 1e6:>13.1f} {err:>+7.1f}%")
    if skipped:
        lines.append(f"# left out {skipped} row(s) of a world of one (nothing moves)")
    for (algorithm, op, layout, why), c in sorted(refused.items()):
        lines.append(f"# refused {c} row(s) of {algorithm} {op} on {layout}: {why}")
    for m, t, err in sorted(done, key=lambda d: -abs(d[2]))[:5]:
        lines.append(f"# worst: {m.op} {m.algorithm} {m.layout} {m.size_bytes} B: measured {m.seconds * 1e6:.1f} us, "
                     f"predicted {t * 1e6:.1f} us ({err:+.1f}%)")
    med = float(np.median([abs(d[2]) for d in done])) if done else float("nan")
    lines.append(f"median abs error {med:.1f}% over {len(done)} rows")
    return lines, bool(done)


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.paper:
            if args.fit or args.check or args.params or args.save:
                raise InputError("--paper takes no other options")
            print(paper_table())
            return 0
        if args.fit and args.params:
            raise InputError("--fit and --params exclude each other (fit, or load fitted parameters)")
        if not args.fit and not args.params:
            raise InputError("give --fit CSV... (or --params JSON), or --paper")
        ops = _choices("--ops", args.ops, OPS)
        algorithms = _choices("--algorithms", args.algorithms, ALGORITHMS)
        try:
            min_bytes = parse_bytes(args.min_bytes, "--min-bytes")
        except ValueError as e:
            raise InputError(str(e)) from None
        if args.fit:
            rows, notes = _load_rows(args.fit, "--fit", ops, algorithms, min_bytes)
            if not rows:
                raise InputError(f"--fit {' '.join(args.fit)}: no usable rows "
                                 "(after --ops / --algorithms / --min-bytes)")
            model = CostModel.fit(rows)
            notes += model.notes
            if not model.fits:
                raise InputError(f"--fit {' '.join(args.fit)}: no row of an algorithm/op the model covers")
        else:
            try:
                model = CostModel.load(args.params)
            except ValueError as e:
                raise InputError(f"--params {e}") from None
            notes = []
        check_rows = []
        if args.check:
            check_rows, more = _load_rows(args.check, "--check", ops, algorithms, min_bytes)
            notes += more
        if args.save:
            try:
                model.save(args.save)
            except OSError as e:
                raise InputError(f"--save {args.save}: cannot write it ({e})") from None
    except InputError as e:
        print(f"costmodel: {e}", file=sys.stderr)
        return 2
    for n in notes:
        print(f"# {n}")
    print(model.summary())
    if args.save:
        print(f"# saved the parameters to {args.save}")
    if not args.check:
        return 0
    lines, any_done = _check(model, check_rows)
    print("\n".join(lines))
    return 0 if any_done else 1


if __name__ == "__main__":
    sys.exit(main())
