"""Expert-parallel MoE cases run inside the shared worker pools (see harness.py)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.testing import assert_close

from models.config import AttentionConfig, ModelConfig, MoEConfig
from models.moe import MoELayer
from models.transformer import DecoderLM
from parallel.collectives import Communicator
from parallel.expert_parallel import apply_expert_parallel

D, HIDDEN = 16, 24
TIGHT = dict(rtol=1e-5, atol=1e-6)


def _tokens(rank: int, n: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank `rank`'s input (2, n, D), shifted along dim 0 so a skewed router prefers expert 0, and an output grad."""
    g = torch.Generator().manual_seed(1000 + rank)
    x = torch.randn(2, n, D, generator=g)
    x[..., 0] += 1.0
    return x, torch.randn(2, n, D, generator=g)


def _layer_grads(layer: MoELayer, x: torch.Tensor, g: torch.Tensor):
    x = x.clone().requires_grad_()
    out = layer(x)
    loss = (out * g).sum() + layer.aux_loss
    grads = torch.autograd.grad(loss, [x, layer.gate.weight, layer.w_up, layer.w_down])
    return out.detach(), grads, layer.stats["dropped_frac"].item()


def _check_layer(rank: int, world: int, comm: Communicator, top_k: int, factor: float, E: int) -> float:
    cfg = MoEConfig(num_experts=E, top_k=top_k, capacity_factor=factor, aux_loss_coef=0.1, z_loss_coef=0.01)
    torch.manual_seed(0)                       # same weights on every rank
    ref = MoELayer(D, HIDDEN, cfg)
    with torch.no_grad():
        ref.gate.weight[0, 0] += 2.0           # skewed routing: expert 0 is popular, so capacity drops
    ep = copy.deepcopy(ref)
    apply_expert_parallel(ep, None, comm=comm)
    lo, hi = rank * (E // world), (rank + 1) * (E // world)
    assert ep.w_up.shape[0] == hi - lo and torch.equal(ep.w_up, ref.w_up[lo:hi])

    x, g = _tokens(rank)
    out, (gx, g_gate, g_up, g_down), dropped = _layer_grads(ep, x, g)
    # Reference: the full layer on each rank's tokens separately; expert grads sum over all ranks' tokens.
    want_up, want_down = torch.zeros_like(ref.w_up), torch.zeros_like(ref.w_down)
    for s in range(world):
        o, (rx, r_gate, r_up, r_down), r_dropped = _layer_grads(ref, *_tokens(s))
        want_up += r_up
        want_down += r_down
        if s == rank:
            assert_close(out, o, **TIGHT)
            assert_close(gx, rx, **TIGHT)
            assert_close(g_gate, r_gate, **TIGHT)
            assert dropped == r_dropped
    assert_close(g_up, want_up[lo:hi], **TIGHT)
    assert_close(g_down, want_down[lo:hi], **TIGHT)
    return dropped


def _check_model(rank: int, world: int, comm: Communicator) -> None:
    """A whole DecoderLM with MoE blocks: loss and every gradient match the unsharded model."""
    cfg = ModelConfig(vocab_size=64, seq_len=8, d_model=D, n_layers=2, n_heads=2, mlp_ratio=1.5,
                      moe=MoEConfig(num_experts=2 * world, top_k=2, capacity_factor=1.0))
    torch.manual_seed(1)
    ref = DecoderLM(cfg, AttentionConfig(chunk_size=4))
    ep = copy.deepcopy(ref)
    apply_expert_parallel(ep, None, comm=comm)
    idx = [torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(s)) for s in range(world)]
    _, loss = ep(idx[rank], torch.roll(idx[rank], 1, 1))
    loss.backward()
    names = [n for n, _ in ref.named_parameters()]
    is_expert = [n.endswith(("w_up", "w_down")) for n in names]
    experts = [torch.zeros_like(p) for p in ref.parameters()]
    for s in range(world):
        _, ref_loss = ref(idx[s], torch.roll(idx[s], 1, 1))
        grads = torch.autograd.grad(ref_loss, list(ref.parameters()))
        experts = [a + b for a, b in zip(experts, grads)]   # expert grads: all ranks' tokens
        if s == rank:
            assert_close(loss, ref_loss, **TIGHT)
            mine = grads                                    # the rest: this rank's tokens only
    lo, hi = rank * 2, (rank + 1) * 2
    for name, expert, p, g_all, g_mine in zip(names, is_expert, ep.parameters(), experts, mine):
        want = g_all[lo:hi] if expert else g_mine
        assert_close(p.grad, want, **TIGHT, msg=lambda m, name=name: f"{name}: {m}")
    assert {id(p) for p in ep.expert_parameters()} == {id(p) for n, p in ep.named_parameters()
                                                          if n.endswith(("w_up", "w_down"))}
    assert all(getattr(p, "_ringtrain_expert", False) for p in ep.expert_parameters())


def expert_parallel_matches_local(rank: int, world: int, algorithm: str = "ring") -> dict:
    """Expert-parallel MoE (ep = world) against one process holding all experts: top-1/top-2,
    capacity 1.0 with skewed routing (drops) and dropless; then a whole model; then bad input."""
    comm = Communicator(None, algorithm=algorithm)
    E = 2 * world
    dropped = {}
    for top_k in (1, 2):
        for factor in (1.0, 0.0):
            dropped[(top_k, factor)] = _check_layer(rank, world, comm, top_k, factor, E)
    _check_model(rank, world, comm)
    stats = {"bytes_sent": comm.stats.bytes_sent, "calls": comm.stats.calls, "wait_s": comm.stats.wait_s}
    bad = MoELayer(D, HIDDEN, MoEConfig(num_experts=E + 1))
    with pytest.raises(ValueError, match=r"model\.moe\.num_experts.*parallel\.ep_size"):
        apply_expert_parallel(bad, None, comm=comm)
    comm.close()
    return {"dropped": dropped, "stats": stats}
