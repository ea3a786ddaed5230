"""All-to-all with per-rank split sizes, as pairwise exchanges around the ring.

At step k = 1 .. p-1 rank r sends its piece for r+k and receives the piece
from r-k, so every step pairs each rank with a distinct partner (no rank is
the target of two senders at once). All steps are posted together: the
transport queues them and the wire stays busy. Registered as "ring".
"""

from __future__ import annotations

import torch

from .registry import register
from .transport import Transport, wait_all


def _offsets(splits: list[int]) -> list[int]:
    out = [0]
    for s in splits:
        out.append(out[-1] + s)
    return out


@register("all_to_all", "ring")
def pairwise_all_to_all(tp: Transport, out: torch.Tensor, inp: torch.Tensor,
                        out_splits: list[int], in_splits: list[int], tuning) -> None:
    p, r = tp.size, tp.rank
    io, oo = _offsets(in_splits), _offsets(out_splits)
    out[oo[r]:oo[r + 1]].copy_(inp[io[r]:io[r + 1]])
    sends, recvs = [], []
    for k in range(1, p):
        dst, src = (r + k) % p, (r - k) % p
        sends.append((inp[io[dst]:io[dst + 1]], dst))
        recvs.append((out[oo[src]:oo[src + 1]], src))
    wait_all(tp.post(sends, recvs))
