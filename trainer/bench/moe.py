"""MoE benchmark: ringtrain's expert-parallel layer against DeepSpeed's, and an MoE model against dense.

    torchrun --standalone --nproc_per_node=4 -m trainer.bench.moe --out runs/bench/moe

Part 1, one MoE layer, forward + backward (loss = <y, fixed random grad> + aux loss), ep_size = world,
--batch x --seq-len tokens per rank: ringtrain's `MoELayer` + `apply_expert_parallel` (one row per
all-to-all algorithm in --algorithms) against `deepspeed.moe.layer.MoE` (trainer/bench/moe_peer.py:
how it is matched) with the same experts, top-k, capacity factor, tokens, d_model and expert hidden
size (--mlp-ratio x --d-model), and the same router and expert weights, so both route alike. Before
timing, every contender's eval-mode output (capacity factor = experts: nothing dropped) is compared
with the local all-experts layer: `max_abs_diff` shows they compute the same layer.
Part 2 (unless --no-model): training steps of a top-1 MoE DecoderLM (every block; expert hidden =
the MLP hidden, so its active parameters are the dense model's plus the routers) against the dense
DecoderLM, both through the native engine's step (DDP over every rank; the MoE model's experts
sharded over all ranks, parallel.ep_size = world).

Trials are interleaved and `ratio` is throughput over the peer's in the same run (DeepSpeed's layer,
the dense model): > 1 means faster. `a2a_bytes_per_step` is what one rank sends per step (rank 0's).
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from torch import nn

from models.config import MoEConfig
from models.moe import MoELayer, capacity
from parallel.expert_parallel import apply_expert_parallel
from parallel.process_group import abort_process

from . import common, flags, moe_peer, output

# params: per rank (layer: router + experts held; model: active non-embedding params)
COLUMNS = ["bench", "impl", "world_size", "num_experts", "top_k", "capacity_factor", "tokens_per_rank",
           "d_model", "hidden", "params", "trials", "step_ms", "step_ms_min", "step_ms_max", "tokens_per_s",
           "ratio", "a2a_bytes_per_step", "dropped_frac", "max_abs_diff"]


def parse_args(argv=None):
    ap = flags.parser("moe", __doc__, shape=tuple(flags.SHAPE),
                      defaults={"d_model": 256, "n_layers": 2, "batch": 8, "trials": 7, "iters": 3, "warmup": 2})
    ap.add_argument("--experts", type=flags.number(), default=8, help="experts per MoE layer (a multiple of the ranks)")
    ap.add_argument("--top-k", type=int, default=1, choices=(1, 2))
    ap.add_argument("--capacity-factor", type=float, default=1.25, help="<= 0: dropless")
    ap.add_argument("--algorithms", type=flags.names(("ring", "native")), default="ring,native",
                    help="ringtrain all-to-all algorithms, one layer row each (the first serves the model)")
    ap.add_argument("--lr", type=flags.number(float, 0, above=True), default=1e-3, help="part 2: AdamW learning rate")
    ap.add_argument("--no-deepspeed", action="store_true", help="part 1 without the DeepSpeed layer")
    ap.add_argument("--no-model", action="store_true", help="part 1 only")
    a = ap.parse_args(argv)
    world = flags.launch_world_size()
    if a.experts % world:
        ap.error(f"--experts={a.experts} must be a multiple of the world size {world}")
    flags.check_shape(ap, a, moe=_moe(a, a.top_k))  # also --top-k <= --experts
    return a


def _moe(a, top_k: int) -> MoEConfig:
    return MoEConfig(num_experts=a.experts, top_k=top_k, capacity_factor=a.capacity_factor,
                     eval_capacity_factor=float(a.experts))


def _hidden(a) -> int:
    return int(a.mlp_ratio * a.d_model)


def _counted(step):
    """step, counting its calls in `.calls`."""
    def run():
        run.calls += 1
        step()
    run.calls = 0
    return run


def _layer_step(forward, module: nn.Module, x: torch.Tensor, grad_out: torch.Tensor):
    """One forward + backward; gradients dropped first so every step does the same work."""
    def step():
        module.zero_grad(set_to_none=True)
        x.grad = None
        y, aux = forward(x)
        ((y * grad_out).sum() + aux).backward()
    return _counted(step)


def bench_layer(a, ctx, mesh) -> tuple[list[dict], dict]:
    """Part 1: rows, and meta (the DeepSpeed version, or why it was not measured)."""
    torch.manual_seed(a.seed)  # the same full set of experts on every rank before sharding
    full = MoELayer(a.d_model, _hidden(a), _moe(a, a.top_k)).to(ctx.device)
    contenders = {}  # name -> (module, x -> (y, aux), comms or None)
    for alg in a.algorithms:
        layer, comms = copy.deepcopy(full), mesh.communicators(algorithm=alg)
        if comms.ep is not None:
            apply_expert_parallel(layer, comms.ep)
        contenders[f"ringtrain[{alg}]"] = (layer, lambda x, m=layer: (m(x), m.aux_loss), comms)
    meta = {}
    if not a.no_deepspeed:
        try:
            ds = moe_peer.deepspeed_layer(full, a.capacity_factor, ctx)
            contenders["deepspeed"] = (ds, moe_peer.deepspeed_forward(ds, full.cfg.aux_loss_coef), None)
            import deepspeed
            meta["deepspeed"] = deepspeed.__version__
        except Exception as e:  # noqa: BLE001 - reported in the results, ringtrain still measured
            meta["deepspeed_error"] = f"{type(e).__name__}: {e}"
    tokens = a.batch * a.seq_len
    g = torch.Generator().manual_seed(a.seed + 1 + ctx.rank)  # each rank its own tokens
    x = torch.randn(tokens, a.d_model, generator=g).to(ctx.device).requires_grad_()
    grad_out = torch.randn(tokens, a.d_model, generator=g).to(ctx.device) / tokens
    diff = _max_diff_from_local(full, contenders, x)
    steps = {n: _layer_step(fwd, m, x, grad_out) for n, (m, fwd, _) in contenders.items()}
    for _, _, comms in contenders.values():
        if comms is not None and comms.ep is not None:
            comms.ep.stats.reset()  # from here on: the timed steps' traffic only
    times = common.time_steps(steps, a, ctx.device)
    W, cap = ctx.world_size, capacity(tokens, a.experts, a.top_k, a.capacity_factor)
    dropped = common.mean_over_ranks([_dropped(m, cap, a.top_k * tokens) for m, _, _ in contenders.values()],
                                     mesh.group("ep"), ctx.device)
    rows = []
    for i, (name, (module, _, comms)) in enumerate(contenders.items()):
        if comms is None:
            a2a = moe_peer.deepspeed_bytes_per_step(a.experts, cap, a.d_model, W)
        else:
            a2a = comms.ep.stats.bytes_sent / steps[name].calls if comms.ep is not None else 0
        rows.append({**_row("layer", name, a, W, a.top_k), **output.timed(times[name], W * tokens),
                     "params": sum(p.numel() for p in module.parameters()), "a2a_bytes_per_step": a2a,
                     "dropped_frac": dropped[i], "max_abs_diff": diff[i]})
        if comms is not None:
            comms.close()
    output.ratios(rows, lambda r: r["impl"] == "deepspeed")
    return rows, meta


@torch.no_grad()
def _max_diff_from_local(full: MoELayer, contenders: dict, x: torch.Tensor) -> list[float]:
    """Each contender's largest eval-mode output difference from the local layer, over all ranks."""
    ref = full.eval()(x)
    diffs = []
    for module, forward, _ in contenders.values():
        module.eval()
        diffs.append((forward(x)[0] - ref).abs().max().double())
        module.train()
    t = torch.stack(diffs)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def _dropped(module: nn.Module, cap: int | None, assignments: int) -> float:
    if isinstance(module, MoELayer):
        return float(module.stats["dropped_frac"])
    return moe_peer.deepspeed_dropped(module, cap, assignments)


def bench_model(a, ctx, dense_mesh, ep_mesh) -> list[dict]:
    """Part 2: the dense and the top-1 MoE DecoderLM through the native engine's step."""
    batch, alg, W = common.FixedBatch(a, ctx.rank, ctx.device), a.algorithms[0], ctx.world_size
    contenders = {
        "dense": common.engine_contender("native", common.build_model(a, ctx.device),
                                         dense_mesh.communicators(algorithm=alg), a, ctx.device, batch, algorithm=alg),
        "moe": common.engine_contender("native", common.build_model(a, ctx.device, moe=_moe(a, 1)),
                                       ep_mesh.communicators(algorithm=alg), a, ctx.device, batch, algorithm=alg,
                                       ep_size=W)}
    times = common.time_steps(contenders, a, ctx.device)
    stats = [c.engine.model.moe_stats() for c in contenders.values()]
    dropped = common.mean_over_ranks([float(s.get("dropped_frac", 0.0)) for s in stats], dense_mesh.group("dp"),
                                     ctx.device)
    rows = []
    for i, (name, c) in enumerate(contenders.items()):
        model, ep = c.engine.model, c.comms.ep
        # active params: the experts held here swapped for the top_k ones a token uses
        active = model.num_params() - sum(p.numel() for p in model.expert_parameters()) + \
            sum(m.active_expert_params() for m in model.modules() if isinstance(m, MoELayer))
        rows.append({**_row("model", name, a, W, None if name == "dense" else 1),
                     **output.timed(times[name], W * a.batch * a.seq_len), "params": active,
                     "a2a_bytes_per_step": ep.stats.bytes_sent / c.steps if ep is not None else None,
                     "dropped_frac": dropped[i], "max_abs_diff": None})
        c.close()
    output.ratios(rows, lambda r: r["impl"] == "dense")
    return rows


def _row(bench: str, impl: str, a, world: int, top_k: int | None) -> dict:
    return {"bench": bench, "impl": impl, "world_size": world, "num_experts": a.experts if top_k else 0,
            "top_k": top_k, "capacity_factor": a.capacity_factor if top_k else None,
            "tokens_per_rank": a.batch * a.seq_len, "d_model": a.d_model, "hidden": _hidden(a)}


def main(argv=None) -> int:
    a = parse_args(argv)
    with common.distributed() as ctx:
        dense_mesh, ep_mesh = common.topology(ctx), common.topology(ctx, ep=ctx.world_size)
        rows, ds_meta = bench_layer(a, ctx, ep_mesh)
        if not a.no_model:
            rows += bench_model(a, ctx, dense_mesh, ep_mesh)
        if ctx.is_main:
            _report(a, rows, output.run_meta(ctx, **ds_meta))
        dist.barrier()
    return 0


def _report(a, rows: list[dict], meta: dict) -> None:
    W, E = meta["world_size"], a.experts
    titles = {
        "layer": f"# MoE layer fwd+bwd, {W} ranks (ep_size = world), E={E} top-{a.top_k} cf={a.capacity_factor}, "
                 f"{a.batch * a.seq_len} tokens/rank, d_model {a.d_model}, hidden {_hidden(a)}; median of "
                 f"{a.trials} interleaved trials x {a.iters} steps; ratio = throughput / DeepSpeed's",
        "model": f"# DecoderLM training steps (native engine), {a.n_layers} blocks, batch {a.batch} x {a.seq_len}: "
                 f"top-1 MoE (E={E}, cf={a.capacity_factor}) vs dense of equal active non-embedding params; "
                 f"ratio = throughput / dense's"}
    tables = []
    for bench, last in (("layer", ["a2a MiB/step", "max|dy|"]), ("model", ["a2a MiB/step", "active params"])):
        mine = [r for r in rows if r["bench"] == bench]
        if mine:
            tables.append(output.text_table(
                ["impl", "ms/step", "[min, max]", "tokens/s", "ratio", "dropped", *last],
                [[r["impl"], f"{r['step_ms']:.1f}", f"[{r['step_ms_min']:.1f}, {r['step_ms_max']:.1f}]",
                  f"{r['tokens_per_s']:.0f}", output.cell(r["ratio"], ".2f", "x"), f"{r['dropped_frac']:.3f}",
                  output.cell(None if r["a2a_bytes_per_step"] is None else r["a2a_bytes_per_step"] / 2**20, ".2f"),
                  output.cell(r["max_abs_diff"], ".1e") if bench == "layer" else f"{r['params']:,}"]
                 for r in mine], titles[bench]))
    if meta.get("deepspeed_error"):
        tables.append(f"deepspeed: not measured - {meta['deepspeed_error']}")
    fig, axes = output.subplots(2)
    for ax, bench in zip(axes, ("layer", "model")):
        mine = [r for r in rows if r["bench"] == bench]
        output.bars(ax, [r["impl"] for r in mine], {"ms/step (median)": [r["step_ms"] for r in mine]}, "ms/step",
                    {"layer": "one MoE layer, fwd+bwd", "model": "DecoderLM training step"}[bench])
    output.write(a.out, "moe", args=a, meta=meta, results=rows, columns=COLUMNS, table="\n\n".join(tables), figure=fig)


if __name__ == "__main__":
    abort_process(None, exit_code=main() or 0)  # no interpreter teardown: see trainer/train.py
