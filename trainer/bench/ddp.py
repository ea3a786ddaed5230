"""Training throughput of ringtrain's data parallelism, per all-reduce algorithm, against torch DDP.

    torchrun --standalone --nproc_per_node=2 -m trainer.bench.ddp --algorithms ring,rhd,tree,native

One row per algorithm in --algorithms: the native engine's step (`build_engine("native")`,
parallel=ddp over that algorithm); the peer is torch's DistributedDataParallel with the same
step written out here: the same AdamW over the same parameter groups at the same constant
learning rate, the same clipping, the same 25 MiB buckets. Every contender starts from the same
weights and steps on the same batches; trials are interleaved and every figure is a ratio to
the peer in the same run (`ratio` > 1: faster than torch DDP).

Having taken the same steps, every contender must hold the same weights: `max_weight_diff` is
each row's largest difference from the peer's weights, beside `max_weight_change`, how far the
peer's weights moved; the last step's gradient norms are reported as well.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from parallel.process_group import abort_process

from ..collective_plan import plan_collectives
from ..engines import StepResult
from ..optim import adamw_factory
from . import common, flags, output

ALGORITHMS = ("ring", "rhd", "tree", "native", "hier", "auto")
PEER = "torch DDP"
COLUMNS = ["engine", "world_size", "tokens_per_s", "step_ms", "step_ms_min", "step_ms_max", "trials", "ratio",
           "last_loss", "grad_norm", "max_weight_diff"]


def parse_args(argv=None):
    ap = flags.parser("ddp", __doc__, shape=tuple(flags.SHAPE), defaults={"trials": 5, "iters": 10, "warmup": 2})
    ap.add_argument("--algorithms", type=flags.names(ALGORITHMS), default="ring,native",
                    help="ringtrain all-reduce algorithms, one row each")
    ap.add_argument("--bucket-mb", type=flags.number(float, 0, above=True), default=25.0,
                    help="gradient bucket size, both sides")
    ap.add_argument("--lr", type=flags.number(float, 0, above=True), default=1e-3, help="AdamW learning rate")
    ap.add_argument("--tuning", type=flags.tuning_file, default=None,
                    help="auto's tuning file (python -m parallel.bench mode=tune); default: calibrate at start")
    ap.add_argument("--calibration-s", type=flags.number(float, 0, above=True), default=5.0,
                    help="auto without a usable tuning file: seconds of start-up calibration")
    return flags.parse(ap, argv)


class TorchDDP:
    """The peer: torch DistributedDataParallel and the native engine's step, written out (fp32)."""

    def __init__(self, model: torch.nn.Module, slices: dict, device: torch.device):
        optim = slices["optim"]
        self.model, self.lr, self.clip = model, optim.lr, optim.grad_clip
        self.ddp = DistributedDataParallel(model, bucket_cap_mb=slices["parallel"].bucket_mb,
                                           device_ids=[device.index] if device.type == "cuda" else None)
        self.optimizer = adamw_factory(optim)(model.param_groups(optim.weight_decay))

    def train_step(self, batches, step: int) -> StepResult:
        x, y = batches.next_batch()
        _, loss = self.ddp(x, y)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=False)
        return StepResult(loss.detach(), norm, self.lr)

    def close(self) -> None:
        pass


def _weights(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().float().reshape(-1) for p in model.parameters()])


def main(argv=None) -> int:
    a = parse_args(argv)
    with common.distributed() as ctx:
        mesh = common.topology(ctx)
        base = common.build_model(a, ctx.device)
        batch = common.FixedBatch(a, ctx.rank, ctx.device)
        contenders = {}
        for alg in a.algorithms:
            comms = mesh.communicators(algorithm=alg, table=a.tuning)
            c = common.engine_contender("native", copy.deepcopy(base), comms, a, ctx.device, batch, algorithm=alg,
                                        bucket_mb=a.bucket_mb)
            if alg == "auto":  # its choice per bucket, printed and kept in <out>/auto/collectives.json
                plan_collectives(c.engine.wrapper, comms, calibration_s=a.calibration_s, device=ctx.device,
                                 run_dir=Path(a.out) / "auto", rank=ctx.rank)
            contenders[f"ringtrain[{alg}]"] = c
        peer = TorchDDP(copy.deepcopy(base), common.engine_slices(a, bucket_mb=a.bucket_mb), ctx.device)
        contenders[PEER] = common.Contender(peer, batch)
        times = common.time_steps(contenders, a, ctx.device)
        loss = common.losses(contenders, mesh.group("dp"), ctx.device)
        reference = _weights(peer.model)
        tokens = a.batch * a.seq_len * ctx.world_size
        rows = [{"engine": name, "world_size": ctx.world_size, **output.timed(times[name], tokens),
                 "first_loss": loss[name][0], "last_loss": loss[name][1], "steps": c.steps,
                 "grad_norm": float(c.last.grad_norm),
                 "max_weight_diff": float((_weights(c.engine.model) - reference).abs().max())}
                for name, c in contenders.items()]
        output.ratios(rows, lambda r: r["engine"] == PEER)
        if ctx.is_main:
            meta = output.run_meta(ctx, params=base.num_params(),
                                   max_weight_change=float((reference - _weights(base)).abs().max()))
            _report(a, rows, meta)
        common.close_all(contenders.values())
    return 0


def _report(a, rows: list[dict], meta: dict) -> None:
    title = (f"# DDP training throughput: {output.run_line(a, meta)}, buckets {a.bucket_mb:g} MiB; ratio = "
             f"throughput / torch DDP's; weights moved up to {meta['max_weight_change']:.2e}")
    table = output.text_table(
        ["engine", "tokens/s", "ms/step", "[min, max]", "ratio", "grad norm", "max |w - w_torch|"],
        [[r["engine"], f"{r['tokens_per_s']:.0f}", f"{r['step_ms']:.1f}",
          f"[{r['step_ms_min']:.1f}, {r['step_ms_max']:.1f}]", output.cell(r["ratio"], ".2f", "x"),
          f"{r['grad_norm']:.4f}", f"{r['max_weight_diff']:.1e}"] for r in rows], title)
    fig, (ax,) = output.subplots()
    output.bars(ax, [r["engine"] for r in rows], {"tokens/s (median)": [r["tokens_per_s"] for r in rows]},
                "tokens/s", f"DDP, {meta['world_size']} ranks: ringtrain per algorithm vs torch DDP")
    output.write(a.out, "ddp", args=a, meta=meta, results=rows, columns=COLUMNS, table=table, figure=fig)


if __name__ == "__main__":
    abort_process(None, exit_code=main() or 0)  # no interpreter teardown: see trainer/train.py
