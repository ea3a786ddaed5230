"""ZeRO optimizer state that any world size can read back (torch.distributed.checkpoint).

Each optimizer state tensor of a unit's shard (Adam's moments) is presented as a DTensor
over the unit's unpadded global vector: shard r covers [r S, (r + 1) S) of its real
elements, which is exactly the layout torch.chunk gives (DTensor's Shard(0)), so a
checkpoint written by N ranks can be read by M ranks and DCP moves the overlapping pieces.
Keys name units, whose composition does not depend on the world size; an expert unit's
state differs per expert slice, so its keys also name the ep rank. Scalars (Adam's step)
are the same on every rank and stay plain tensors.
"""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from ..flat_params import FlatUnit
from ..mesh import Comms


def dtensor_optimizer_state(units: list[FlatUnit], optimizer, comms: Comms, *, materialize: bool = False) -> dict:
    """Live views of `optimizer`'s state for the units' shards, keyed `unit<i>[.ep<r>].<key>`; a
    load writes into them. With materialize, AdamW's lazily created state is made first."""
    device_type = units[0].full.device.type if units else "cpu"
    meshes: dict[int, DeviceMesh] = {}
    out = {}
    for u in units:
        state = optimizer.state[u.shard]
        if materialize and not state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(u.shard)
            state["exp_avg_sq"] = torch.zeros_like(u.shard)
        mesh = meshes.get(id(u.comm))
        if mesh is None:
            mesh = meshes[id(u.comm)] = DeviceMesh.from_group(u.comm.group, device_type)
        real = max(0, min(u.S, u.numel - u.mine.start))
        name = f"unit{u.index}" + (f".ep{comms.ep.rank}" if u.expert else "")
        for key, t in state.items():
            if torch.is_tensor(t) and t.dim() == 1 and t.numel() == u.S:
                out[f"{name}.{key}"] = DTensor.from_local(t[:real], mesh, [Shard(0)], run_check=False,
                                                          shape=(u.numel,), stride=(1,))
            elif torch.is_tensor(t):
                out[f"{name}.{key}"] = t
    return out
