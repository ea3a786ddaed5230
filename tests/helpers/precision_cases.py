"""Mixed-precision cases run inside the shared worker pools (see harness.py)."""

from __future__ import annotations

import math

import torch

from models.config import AttentionConfig, ModelConfig
from models.transformer import DecoderLM
from parallel.collectives import Communicator
from parallel.data_parallel import apply_ddp
from parallel.loss_scale import DynamicLossScaler
from parallel.mesh import Comms
from parallel.precision import PrecisionPolicy, unscale_clip_step
from parallel.zero import apply_zero
from trainer.config import ZERO_STAGES

V, T = 64, 16


def _model(seed: int) -> DecoderLM:
    torch.manual_seed(seed)
    return DecoderLM(ModelConfig(vocab_size=V, seq_len=T, d_model=32, n_layers=2, n_heads=2, mlp_ratio=2.0),
                     AttentionConfig(kind="softmax"))


def _wrap(model, comm, parallel: str, policy: PrecisionPolicy):
    mp = {"param_dtype": policy.param_dtype, "reduce_dtype": policy.reduce_dtype,
          "param_groups": model.param_groups(0.1), "bucket_mb": 0.01}
    if parallel == "ddp":
        return apply_ddp(model, Comms(dp=comm), **mp)
    return apply_zero(model, Comms(dp=comm), stage=ZERO_STAGES[parallel], blocks=list(model.blocks), **mp)


LR = 3e-3


def _make_opt(groups):
    return torch.optim.AdamW(groups, lr=LR, betas=(0.9, 0.95))


def _batch(step: int, n: int, noise: float = 0.0):
    """Sequences of a fixed affine recurrence mod V (learnable), with optional random tokens."""
    g = torch.Generator().manual_seed(4099 * step + 17)
    start = torch.randint(0, V, (n, 1), generator=g)
    seq = (start * 5 + 3 * torch.arange(T + 1)) % V
    if noise:
        flip = torch.rand(seq.shape, generator=g) < noise
        seq = torch.where(flip, torch.randint(0, V, seq.shape, generator=g), seq)
    return seq[:, :-1], seq[:, 1:]


def _snapshot(wrapper) -> list[torch.Tensor]:
    """Every tensor a step could change on this rank: parameters in compute, the
    optimizer's parameters (masters / shards) and its state. Collective (ZeRO-3 gathers)."""
    with wrapper.gathered():
        out = [p.detach().clone() for p in wrapper.module.parameters()]
    for group in wrapper.optimizer.param_groups:
        for q in group["params"]:
            out.append(q.detach().clone())
            out += [t.clone() for t in wrapper.optimizer.state[q].values() if torch.is_tensor(t)]
    return out


def overflow_on_one_rank_skips_everywhere(rank: int, world: int, parallel: str, bad_rank: int = 1,
                                          param: str = "blocks.1.mlp.down_proj.weight") -> dict:
    """fp16: step 0 is normal; on step 1 one gradient element of `param` is made inf on
    `bad_rank` only: every rank must skip (bitwise-unchanged parameters, masters and
    optimizer state; the scale backs off); step 2 is applied again."""
    policy = PrecisionPolicy.from_name("fp16")
    comm = Communicator(None)
    model = _model(5)
    wrapper = _wrap(model, comm, parallel, policy)
    wrapper.build_optimizer(_make_opt)
    scaler = DynamicLossScaler(init_scale=2.0**10, growth_interval=1000)
    target = dict(model.named_parameters())[param]

    def poison(g):
        g = g.clone()
        g.view(-1)[3] = float("inf")
        return g

    stepped, names, unchanged = [], [], None
    for step in range(3):
        handle = target.register_hook(poison) if (step == 1 and rank == bad_rank) else None
        x, y = _batch(step, 2 * world)
        mine = slice(2 * rank, 2 * rank + 2)
        before = _snapshot(wrapper)
        with policy.autocast(torch.device("cpu")):
            _, loss = wrapper(x[mine], y[mine])
        wrapper.backward(loss * scaler.scale)
        wrapper.finish_gradient_sync()
        stepped.append(unscale_clip_step(wrapper, scaler, max_norm=1.0, report_overflow=True).stepped)
        if step == 1:
            names = wrapper.nonfinite_grad_names()
            after = _snapshot(wrapper)
            unchanged = len(before) == len(after) and all(torch.equal(a, b) for a, b in zip(before, after))
        wrapper.zero_grad()
        if handle is not None:
            handle.remove()
    comm.close()
    return {"stepped": stepped, "unchanged": unchanged, "names": names, "scale": scaler.scale,
            "skipped": scaler.state.skipped_steps}


def _mixed_one(rank: int, world: int, comm: Communicator, parallel: str, precision: str, grad_reduce: str,
               steps: int) -> dict:
    policy = PrecisionPolicy.from_name(precision, grad_reduce=grad_reduce)
    half = policy.param_dtype
    ref = _model(11)                                # rank 0's initial weights, built before any wrapper
    model = _model(11 + rank)                       # the broadcast makes every rank's rank 0's
    names = [n for n, _ in ref.named_parameters()]
    masters = {n: p.detach().clone().requires_grad_() for n, p in ref.named_parameters()}
    by_id = {id(p): masters[n] for n, p in ref.named_parameters()}
    ref_opt = _make_opt([dict(g, params=[by_id[id(p)] for p in g["params"]]) for g in ref.param_groups(0.1)])
    ref.to(half)
    wrapper = _wrap(model, comm, parallel, policy)
    wrapper.build_optimizer(_make_opt)
    scale = 2.0**8 if precision == "fp16" else 1.0
    scaler = DynamicLossScaler(init_scale=scale) if precision == "fp16" else None
    out = {"norms": [], "ref_norms": [], "worst_abs": [], "worst_ulps": [], "half_params_exact": []}
    state = wrapper.consolidated_state_dict()       # float32 masters on rank 0
    if rank == 0:  # the broadcast made every rank start from rank 0's weights
        out["starts_from_rank0"] = all(torch.equal(state[n], masters[n]) for n in names)
    for step in range(steps):
        if rank == 0:  # the reference starts this step from the implementation's masters
            with torch.no_grad():
                for n in names:
                    masters[n].copy_(state[n])
                for n, p in ref.named_parameters():
                    p.copy_(masters[n])
        x, y = _batch(step, 2 * world)
        with policy.autocast(torch.device("cpu")):
            _, loss = wrapper(x[2 * rank: 2 * rank + 2], y[2 * rank: 2 * rank + 2])
        wrapper.backward(loss * scale)
        wrapper.finish_gradient_sync()
        outcome = unscale_clip_step(wrapper, scaler, max_norm=0.5)
        assert outcome.stepped, "no overflow expected at this scale"
        wrapper.zero_grad()
        state = wrapper.consolidated_state_dict()
        with wrapper.gathered():
            in_compute = {n: p.detach().clone() for n, p in model.named_parameters()}
        if rank != 0:
            continue
        # the reference: every rank's micro-batch in turn (same shapes, so the same half
        # gradients), summed in the reduce dtype, averaged, unscaled, clipped, AdamW on masters
        total = {n: torch.zeros_like(masters[n], dtype=policy.reduce_dtype) for n in names}
        for r in range(world):
            ref.zero_grad()
            with policy.autocast(torch.device("cpu")):
                _, ref_loss = ref(x[2 * r: 2 * r + 2], y[2 * r: 2 * r + 2])
            (ref_loss * scale).backward()
            for n, p in ref.named_parameters():
                total[n] += p.grad.to(total[n].dtype)
        for n in names:
            masters[n].grad = (total[n] / world).float() / scale
        ref_norm = torch.nn.utils.clip_grad_norm_([masters[n] for n in names], 0.5)
        ref_opt.step()
        out["norms"].append(outcome.norm.item())
        out["ref_norms"].append(ref_norm.item())
        diff = [(state[n] - masters[n].detach()).abs() for n in names]
        # a float32 ulp of the master, or of the learning rate for masters smaller than it (an
        # update's rounding error scales with lr, whatever the weight's own magnitude)
        floor = [masters[n].detach().abs().clamp(min=LR) for n in names]
        spacing = [torch.nextafter(f, torch.tensor(float("inf"))) - f for f in floor]
        out["worst_abs"].append(max(d.max().item() for d in diff))
        out["worst_ulps"].append(max((d / u).max().item() for d, u in zip(diff, spacing)))
        # the half parameters in compute are the masters rounded, after every applied step
        out["half_params_exact"].append(all(in_compute[n].dtype == half
                                            and torch.equal(in_compute[n], state[n].to(half)) for n in names))
    if rank != 0:
        return {}
    out["dtypes"] = sorted({str(v.dtype) for v in state.values()})
    return out


def mixed_matches_reference(rank: int, world: int, configs: list[tuple[str, str, str]], steps: int = 3) -> dict:
    """For each (parallel, precision, grad_reduce): the distributed mixed-precision step equals
    a single-process reference of the same policy (a fresh model of rank 0's initial weights
    with its own float32 masters and AdamW, built before the wrapper), step by step from the
    same masters. Before each step the reference's masters are set to the implementation's
    consolidated ones (without this a 1-ulp difference of the masters flips half roundings of
    the parameters, which Adam amplifies from step to step: chaotic, not a bug; the Adam
    moments are the reference's own); then: half parameters, each rank's micro-batch
    forward/backward in half, gradients averaged in the communication dtype, unscaled,
    clipped by the global norm, AdamW on the masters.
    Returns, on rank 0, per config: whether the implementation started from rank 0's weights,
    and per step both pre-clip global norms, the worst master difference after the step
    (absolute, and in float32 ulps of the master or of the learning rate, the larger), and
    whether the half parameters in compute are exactly the masters rounded."""
    comm = Communicator(None)
    try:
        return {"-".join(c): _mixed_one(rank, world, comm, *c, steps=steps) for c in configs}
    finally:
        comm.close()


def loss_curve(rank: int, world: int, precision: str, steps: int = 100, parallel: str = "zero2") -> list[float]:
    """Mean loss over ranks at every step of `steps` AdamW steps of the small model on
    2-sequence micro-batches per rank (a learnable recurrence with 10% random tokens)."""
    policy = PrecisionPolicy.from_name(precision)
    comm = Communicator(None)
    model = _model(23)
    wrapper = _wrap(model, comm, parallel, policy)
    wrapper.build_optimizer(_make_opt)
    scaler = DynamicLossScaler(growth_interval=50) if precision == "fp16" else None
    curve = []
    for step in range(steps):
        x, y = _batch(step, 4 * world, noise=0.1)
        mine = slice(4 * rank, 4 * rank + 4)
        with policy.autocast(torch.device("cpu")):
            _, loss = wrapper(x[mine], y[mine])
        wrapper.backward(loss * (scaler.scale if scaler else 1.0))
        wrapper.finish_gradient_sync()
        unscale_clip_step(wrapper, scaler, max_norm=1.0)
        wrapper.zero_grad()
        mean = loss.detach().reshape(1).clone()
        comm.all_reduce(mean, op="avg")
        curve.append(mean.item())
    comm.close()
    assert all(math.isfinite(v) for v in curve)
    return curve


def nonfinite_loss_names_the_rank(rank: int, world: int, bad_rank: int = 1) -> dict:
    """fp32, no scaler: a nan loss on `bad_rank` only (its gradients poisoned too) is not
    stepped on any rank, and every rank learns which rank it was."""
    comm = Communicator(None)
    model = _model(3)
    wrapper = _wrap(model, comm, "ddp", PrecisionPolicy.from_name("fp32"))
    wrapper.build_optimizer(_make_opt)
    x, y = _batch(0, 2 * world)
    _, loss = wrapper(x[2 * rank: 2 * rank + 2], y[2 * rank: 2 * rank + 2])
    if rank == bad_rank:
        loss = loss * float("nan")
    wrapper.backward(loss)
    wrapper.finish_gradient_sync()
    before = [p.detach().clone() for p in model.parameters()]
    out = unscale_clip_step(wrapper, None, max_norm=1.0, loss=loss.detach())
    same = all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    comm.close()
    return {"stepped": out.stepped, "nonfinite": out.nonfinite, "ranks": out.nonfinite_ranks, "unchanged": same}
