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

from .cli import main
from .features import *  # noqa: F401,F403
from .features import _Acc, Features, features, segment_count  # noqa: F401
from .fit import CostModel, Fit, InputError, Measurement, UnevenLayout, Undetermined, nnls, read_results  # noqa: F401
from .paper import paper_model, paper_rows, paper_table  # noqa: F401
