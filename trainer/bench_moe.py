"""MoE benchmark: ringtrain's expert-parallel layer against DeepSpeed's, and a full MoE model against dense.

    torchrun --standalone --nproc_per_node=4 -m trainer.bench_moe --out runs/moe_bench

Part 1, one MoE layer, forward + backward (loss = <y, fixed random grad> + aux loss), ep_size = world:
ringtrain's `MoELayer` + `apply_expert_parallel` (one row per all-to-all algorithm in --algorithms)
against `deepspeed.moe.layer.MoE` with the same experts, top-k, capacity factor, tokens per rank,
d_model and expert hidden size, and the same router and expert weights (copied), so both route alike.
Part 2, tokens/s of a MoE DecoderLM (top-1, every block, expert hidden = the MLP hidden, so its active
parameters are the dense model's plus the routers) against the dense DecoderLM, forward + backward
on the same ranks (experts sharded over all ranks; no optimizer, no gradient all-reduce: they are the
same code for both and not what this compares).

Timing (DESIGN "Measurement conventions"): warm-up, then `--trials` trials; in each trial every
contender runs `--iters` back-to-back steps after a barrier (host timer, device synchronised), the
order reversed every other trial (A B, B A, ...) so drift and machine noise hit all contenders
alike. A trial's time is the mean over ranks; the figure is the median over trials, and ratios are
throughput ratios to the peer in the same run (DeepSpeed, dense): > 1 means ringtrain is faster.
Before timing, every contender's eval-mode output (capacity factor = num_experts, so nothing is
dropped) is compared with the local all-experts layer: `max_abs_diff` shows they compute the same layer.

How DeepSpeed (0.19.x, sharded_moe.py top1gating / top2gating) is matched, and what still differs:
- Capacity: DeepSpeed uses ceil(S / E * cf) for top-1 and ceil(S / E * 2 cf) for top-2, S = this
  rank's tokens, then max(., min_capacity); ringtrain uses ceil(k S / E * cf). We pass
  min_capacity=0, so the capacities are equal. cf <= 0 (ringtrain's dropless) maps to drop_tokens=False.
- Which tokens are dropped: ringtrain keeps the `capacity` highest router probabilities per expert
  (first and second choices compete). DeepSpeed top-1 drops at random with Random Token Selection
  (use_rts=True, its default) or by an arbitrary top-k over a 0/1 mask; top-2 fills first choices
  before second choices in token order. We pass use_rts=False and top2_2nd_expert_sampling=False
  (deterministic second expert, as ringtrain's top-2): both are DeepSpeed's cheaper paths, so they
  can only help it. Gates: top-1 uses the raw probability, top-2 renormalises the pair, in both.
- Work: DeepSpeed pads every expert to `capacity` rows: each of its 4 all-to-alls (2 forward,
  2 backward) moves E*C*d values and every expert runs C rows whatever its load. ringtrain sends
  only the kept rows (split sizes from a small all-to-all of per-expert counts) and runs each local
  expert once over exactly its rows. ringtrain also computes the router z-loss; DeepSpeed does not.
- Experts: DeepSpeed's expert is Linear(d, h) -> GELU (erf) -> Linear(h, d), no bias: the same MLP
  as ringtrain's stacked w_up/w_down. DeepSpeed's all-to-all is torch.distributed's (gloo on CPU);
  ringtrain's goes through its collective library (`--algorithms`: ring, native).
On a CPU machine DeepSpeed is told DS_ACCELERATOR=cpu; it runs on gloo once torch.distributed is up.
Writes moe_bench.csv and moe_bench.json to --out and prints a table on rank 0.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import io
import json
import logging
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from models import AttentionConfig, DecoderLM, ModelConfig
from models.config import MoEConfig
from models.moe import MoELayer, capacity

from parallel.expert_parallel import apply_expert_parallel
from parallel.process_group import init_distributed, shutdown

# One row per contender. params: per rank (layer: router + experts held; model: active non-embedding
# params); ratio: throughput over the peer's (deepspeed, dense); a2a bytes: sent per step by one rank.
COLUMNS = ["bench", "impl", "world_size", "num_experts", "top_k", "capacity_factor", "tokens_per_rank",
           "d_model", "hidden", "params", "trials", "step_ms", "step_ms_min", "step_ms_max", "tokens_per_s",
           "ratio", "a2a_bytes_per_step", "dropped_frac", "max_abs_diff"]


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="torchrun ... -m trainer.bench_moe", description=__doc__.split("\n")[0])
    ap.add_argument("--experts", type=int, default=8, help="experts per MoE layer (divisible by world size)")
    ap.add_argument("--top-k", type=int, default=1, choices=(1, 2))
    ap.add_argument("--capacity-factor", type=float, default=1.25, help="<= 0: dropless")
    ap.add_argument("--tokens", type=int, default=1024, help="tokens per rank per step")
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--hidden", type=int, default=1024, help="expert (and dense MLP) hidden width")
    ap.add_argument("--algorithms", default="ring,native",
                    help="ringtrain all-to-all algorithms to time (the first one also serves the full MoE model)")
    ap.add_argument("--layers", type=int, default=2, help="full model: decoder blocks (0 = skip the model)")
    ap.add_argument("--seq-len", type=int, default=128, help="full model: sequence length")
    ap.add_argument("--heads", type=int, default=4, help="full model: attention heads")
    ap.add_argument("--trials", type=int, default=7)
    ap.add_argument("--iters", type=int, default=3, help="steps per contender per trial")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per contender")
    ap.add_argument("--no-deepspeed", action="store_true", help="time ringtrain only")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/moe_bench")
    a = ap.parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", 1))  # known before any process group: fail early
    if a.experts < 1 or a.experts % world:
        ap.error(f"--experts={a.experts} must be a positive multiple of the world size {world}")
    if a.top_k > a.experts:
        ap.error(f"--top-k={a.top_k} must be <= --experts={a.experts}")
    for name in ("tokens", "d_model", "hidden", "trials", "iters", "seq_len", "heads"):
        if getattr(a, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if a.layers and (a.d_model % a.heads or (a.d_model // a.heads) % 2):
        ap.error(f"--d-model={a.d_model} / --heads={a.heads} must be an even head dim (RoPE)")
    if a.layers and int(a.hidden / a.d_model * a.d_model) != a.hidden:  # the model's mlp_ratio must give it
        ap.error(f"--hidden={a.hidden} is not int(mlp_ratio * --d-model) for any float ratio; pick another")
    a.algorithms = [s for s in a.algorithms.split(",") if s]
    if not a.algorithms or any(s not in ("ring", "native") for s in a.algorithms):
        ap.error(f"--algorithms must be a comma list of ring, native; got {a.algorithms}")
    return a


# -- contenders -----------------------------------------------------------

def deepspeed_layer(full: MoELayer, a, ctx) -> nn.Module:
    """deepspeed.moe.layer.MoE holding this rank's slice of `full`'s experts and its router."""
    if ctx.device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before the first deepspeed import
    import deepspeed
    from deepspeed.moe.layer import MoE

    deepspeed.utils.logger.setLevel(logging.WARNING)
    # torch.distributed is already up: DeepSpeed only wraps it (TorchBackend over gloo / nccl).
    deepspeed.init_distributed(dist_backend=ctx.backend, verbose=False)
    d, h, E = a.d_model, a.hidden, a.experts
    expert = nn.Sequential(nn.Linear(d, h, bias=False), nn.GELU(), nn.Linear(h, d, bias=False))
    moe = MoE(d, expert, num_experts=E, ep_size=ctx.world_size, k=a.top_k,
              capacity_factor=a.capacity_factor if a.capacity_factor > 0 else 1.0,
              eval_capacity_factor=float(E), min_capacity=0, drop_tokens=a.capacity_factor > 0,
              use_residual=False, use_rts=False, top2_2nd_expert_sampling=False)
    with contextlib.redirect_stdout(io.StringIO()):  # it prints "creating a new group" per rank
        moe.set_deepspeed_parallelism()
    n_local, inner = E // ctx.world_size, moe.deepspeed_moe
    with torch.no_grad():  # DeepSpeed's ep rank r holds experts [r*n_local, (r+1)*n_local), as ringtrain
        inner.gate.wg.weight.copy_(full.gate.weight)
        for j, ex in enumerate(inner.experts.deepspeed_experts):
            ex[0].weight.copy_(full.w_up[ctx.rank * n_local + j].T)
            ex[2].weight.copy_(full.w_down[ctx.rank * n_local + j].T)
    return moe.to(ctx.device)


def layer_contenders(a, ctx):
    """{name: (module, forward x -> (y, aux), comm or None)} plus the local reference layer."""
    torch.manual_seed(a.seed)  # same full set of experts on every rank before sharding
    cfg = MoEConfig(num_experts=a.experts, top_k=a.top_k, capacity_factor=a.capacity_factor,
                    eval_capacity_factor=float(a.experts))  # eval = the no-drop check below
    full = MoELayer(a.d_model, a.hidden, cfg).to(ctx.device)
    out = {}
    for alg in a.algorithms:
        layer = copy.deepcopy(full)
        comm = apply_expert_parallel(layer, None, algorithm=alg) if ctx.world_size > 1 else None
        out[f"ringtrain[{alg}]"] = (layer, lambda x, m=layer: (m(x), m.aux_loss), comm)
    error = None
    if not a.no_deepspeed:
        try:
            ds = deepspeed_layer(full, a, ctx)

            def ds_forward(x, m=ds, coef=cfg.aux_loss_coef):  # DeepSpeed's l_aux comes without coefficient
                y, l_aux, _ = m(x)
                return y, coef * l_aux
            out["deepspeed"] = (ds, ds_forward, None)
        except Exception as e:  # noqa: BLE001 - reported in the results, ringtrain still measured
            error = f"{type(e).__name__}: {e}"
    return full, out, error


def model_contenders(a, ctx):
    """Dense and top-1 MoE DecoderLM of equal active parameters (+ routers), same seed and shape."""
    shape = dict(vocab_size=256, seq_len=min(a.seq_len, a.tokens), d_model=a.d_model, n_layers=a.layers,
                 n_heads=a.heads, mlp_ratio=a.hidden / a.d_model)
    out = {}
    for name, moe in (("dense", MoEConfig()), ("moe", MoEConfig(num_experts=a.experts, top_k=1,
                                                                  capacity_factor=a.capacity_factor))):
        torch.manual_seed(a.seed)
        model = DecoderLM(ModelConfig(**shape, moe=moe), AttentionConfig()).to(ctx.device)
        comm = apply_expert_parallel(model, None, algorithm=a.algorithms[0]) \
            if moe.num_experts and ctx.world_size > 1 else None
        # active params: experts held here swapped for the top_k ones a token uses
        active = model.num_params() - sum(p.numel() for p in model.expert_parameters()) + \
            sum(m.active_expert_params() for m in model.modules() if isinstance(m, MoELayer))
        # the step's loss is the LM loss (+ aux and z losses); targets = inputs is as costly as shifted ones
        out[name] = (model, (lambda idx, m=model: (m(idx, idx)[1], None)), comm, active)
    return shape, out


# -- timing ---------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(steps: dict, a, device) -> dict[str, list[float]]:
    """Per-step seconds of each trial, mean over ranks: {name: [trial times]}."""
    for step in steps.values():
        for _ in range(a.warmup):
            step()
    names, times = list(steps), {n: [] for n in steps}
    for t in range(a.trials):
        for n in (names if t % 2 == 0 else names[::-1]):
            _sync(device)
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(a.iters):
                steps[n]()
            _sync(device)
            times[n].append((time.perf_counter() - t0) / a.iters)
    return dict(zip(names, _mean_over_ranks([times[n] for n in names], device)))


def make_step(forward, module: nn.Module, inputs, grad_out=None):
    """One forward + backward; gradients dropped first so every step does the same work."""
    def step():
        module.zero_grad(set_to_none=True)
        if isinstance(inputs, torch.Tensor) and inputs.requires_grad:
            inputs.grad = None
        y, aux = forward(inputs)
        loss = y if grad_out is None else (y * grad_out).sum() + aux
        loss.backward()
    return step


# -- the two benchmarks ---------------------------------------------------

def bench_layer(a, ctx) -> tuple[list[dict], str | None]:
    full, contenders, ds_error = layer_contenders(a, ctx)
    g = torch.Generator().manual_seed(a.seed + 1 + ctx.rank)  # each rank its own tokens
    x = torch.randn(a.tokens, a.d_model, generator=g).to(ctx.device).requires_grad_()
    grad_out = torch.randn(a.tokens, a.d_model, generator=g).to(ctx.device) / a.tokens
    with torch.no_grad():
        ref = full.eval()(x)
    diffs = {}
    for name, (module, fwd, _) in contenders.items():
        module.eval()
        with torch.no_grad():
            diffs[name] = (fwd(x)[0] - ref).abs().max().reshape(1)
        module.train()
    steps = {n: make_step(fwd, m, x, grad_out) for n, (m, fwd, _) in contenders.items()}
    for _, _, comm in contenders.values():
        if comm is not None:
            comm.stats.reset()
    times = interleaved(steps, a, ctx.device)
    E, k, cf, W = a.experts, a.top_k, a.capacity_factor, ctx.world_size
    cap = capacity(a.tokens, E, k, cf)
    # DeepSpeed's all-to-all bytes per step and rank: 4 all-to-alls of (E, C, d) fp32, (W-1)/W leaves the rank
    ds_bytes = 4 * E * cap * a.d_model * 4 * (W - 1) // W if cap else None  # dropless: C varies
    n_steps = a.trials * a.iters + a.warmup
    diff = torch.cat(list(diffs.values()))
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    dropped = _mean_over_ranks([_dropped(m, cap, k * a.tokens) for m, _, _ in contenders.values()], ctx.device)
    rows = []
    for i, (name, (module, _, comm)) in enumerate(contenders.items()):
        a2a = comm.stats.bytes_sent / n_steps if comm is not None else (ds_bytes if name == "deepspeed" else 0)
        rows.append(_row("layer", name, a, W, times[name], a.tokens, a2a, dropped[i], float(diff[i]),
                         sum(p.numel() for p in module.parameters()), a.top_k, a.capacity_factor))
    _ratios(rows, "deepspeed")
    for _, _, comm in contenders.values():
        if comm is not None:
            comm.close()
    return rows, ds_error


def bench_model(a, ctx) -> list[dict]:
    shape, contenders = model_contenders(a, ctx)
    batch = max(1, a.tokens // shape["seq_len"])
    g = torch.Generator().manual_seed(a.seed + 1 + ctx.rank)
    idx = torch.randint(0, shape["vocab_size"], (batch, shape["seq_len"]), generator=g).to(ctx.device)
    steps = {n: make_step(fwd, m, idx) for n, (m, fwd, _, _) in contenders.items()}
    times = interleaved(steps, a, ctx.device)
    dropped = _mean_over_ranks([_dropped(m) for m, _, _, _ in contenders.values()], ctx.device)
    rows = [_row("model", n, a, ctx.world_size, times[n], batch * shape["seq_len"], None, dropped[i], None,
                 active, *((None, None) if n == "dense" else (1, a.capacity_factor)))
            for i, (n, (_, _, _, active)) in enumerate(contenders.items())]
    _ratios(rows, "dense")
    for _, _, comm, _ in contenders.values():
        if comm is not None:
            comm.close()
    return rows


def _dropped(module: nn.Module, cap: int | None = None, assignments: int = 0) -> float:
    """Dropped (token, slot) fraction of the last training step (0 for a dense model)."""
    if isinstance(module, DecoderLM):
        return float(module.moe_stats().get("dropped_frac", 0.0))
    if isinstance(module, MoELayer):
        return float(module.stats["dropped_frac"])
    # DeepSpeed: every expert keeps min(routed, capacity) assignments (exp_counts = routed)
    counts = module.deepspeed_moe.exp_counts
    return 0.0 if cap is None else 1.0 - float(counts.clamp(max=cap).sum()) / assignments


def _mean_over_ranks(values: list[float], device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return (t.cpu() / dist.get_world_size()).tolist()


def _row(bench, impl, a, world, trial_s, tokens, a2a, dropped, diff, params, top_k, cf) -> dict:
    med = statistics.median(trial_s)
    return {"bench": bench, "impl": impl, "world_size": world, "num_experts": a.experts if top_k else 0,
            "top_k": top_k, "capacity_factor": cf, "tokens_per_rank": tokens, "d_model": a.d_model,
            "hidden": a.hidden, "params": params, "trials": len(trial_s), "step_ms": med * 1e3,
            "step_ms_min": min(trial_s) * 1e3, "step_ms_max": max(trial_s) * 1e3,
            "tokens_per_s": world * tokens / med, "ratio": None, "a2a_bytes_per_step": a2a,
            "dropped_frac": dropped, "max_abs_diff": diff, "trial_ms": [t * 1e3 for t in trial_s]}


def _ratios(rows: list[dict], peer: str) -> None:
    """Throughput of each row over the peer's (= peer step time / row step time)."""
    base = next((r for r in rows if r["impl"] == peer), None)
    for r in rows:
        r["ratio"] = base["step_ms"] / r["step_ms"] if base else None


# -- report ---------------------------------------------------------------

def report(rows: list[dict], meta: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "moe_bench.json").write_text(json.dumps({"meta": meta, "results": rows}, indent=1))
    with open(out / "moe_bench.csv", "w", newline="") as f:
        w = csv.DictWriter(f, COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    a = meta["args"]

    def fmt(v, spec, unit=""):  # None (no peer, no measurement) as a right-aligned dash
        return "-".rjust(len(format(0.0, spec)) + len(unit)) if v is None else format(v, spec) + unit

    titles = {
        "layer": f"# MoE layer fwd+bwd, {meta['world_size']} ranks (ep_size = world), E={a['experts']} "
                 f"top-{a['top_k']} cf={a['capacity_factor']}, {a['tokens']} tokens/rank, d_model {a['d_model']}, "
                 f"hidden {a['hidden']}; median of {a['trials']} interleaved trials x {a['iters']} steps; "
                 f"ratio = throughput / DeepSpeed's",
        "model": f"# full DecoderLM fwd+bwd, {a['layers']} blocks, seq {meta['model_seq_len']}: top-1 MoE "
                 f"(E={a['experts']}, cf={a['capacity_factor']}) vs dense of equal active non-embedding params; "
                 f"ratio = throughput / dense's"}
    for bench, last in (("layer", "a2a MiB/step  max|dy|"), ("model", "active params")):
        mine = [r for r in rows if r["bench"] == bench]
        if not mine:
            continue
        print(titles[bench])
        print(f"{'impl':<18} {'ms/step':>8} {'[min, max]':>16} {'tokens/s':>9} {'ratio':>6} {'dropped':>7}  {last}")
        for r in mine:
            span = f"[{r['step_ms_min']:.1f}, {r['step_ms_max']:.1f}]"
            a2a = r["a2a_bytes_per_step"]
            tail = (f"{fmt(None if a2a is None else a2a / 2**20, '12.2f')} {fmt(r['max_abs_diff'], '8.1e')}"
                    if bench == "layer" else f"{r['params']:>13,}")
            print(f"{r['impl']:<18} {r['step_ms']:8.1f} {span:>16} {r['tokens_per_s']:9.0f} "
                  f"{fmt(r['ratio'], '5.2f', 'x')} {r['dropped_frac']:7.3f}  {tail}")
        if bench == "layer" and meta.get("deepspeed_error"):
            print(f"deepspeed: not measured - {meta['deepspeed_error']}")
    print(f"wrote {out / 'moe_bench.csv'} and {out / 'moe_bench.json'}")


def main(argv=None) -> int:
    a = parse_args(argv)
    ctx = init_distributed()
    try:
        rows, ds_error = bench_layer(a, ctx)
        meta = {"world_size": ctx.world_size, "backend": ctx.backend, "device": ctx.device.type,
                "torch": torch.__version__, "threads": torch.get_num_threads(), "host": platform.node(),
                "args": vars(a), "deepspeed_error": ds_error, "model_seq_len": min(a.seq_len, a.tokens)}
        if not a.no_deepspeed and ds_error is None:
            import deepspeed
            meta["deepspeed"] = deepspeed.__version__
        if a.layers:
            rows += bench_model(a, ctx)
        if ctx.is_main:
            report(rows, meta, Path(a.out))
        dist.barrier()
    finally:
        shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
