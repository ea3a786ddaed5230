"""The model fed with published H100 / InfiniBand figures (`--paper`)."""

from __future__ import annotations

from typing import Iterable

import numpy as np

from .features import *  # noqa: F401,F403
from .features import features
from .fit import CostModel

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
