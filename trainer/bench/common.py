"""What the training benchmarks share: the job, the model, this rank's batch, the config slices an
engine is built from, and a contender that trains through an engine's real step.

Every contender starts from the same weights (`build_model`, seed --seed) and steps on the same
batch (`FixedBatch`: each rank its own, drawn from --seed and the rank), so contenders differ only
in how they train. A ringtrain row is `build_engine("native", ...)`'s `train_step`, the trainer's
own step; DeepSpeed and Accelerate rows are their engines' `train_step`.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch.distributed as dist

from models.config import MoEConfig
from models.transformer import DecoderLM
from parallel.bench.timing import interleaved
from parallel.mesh import MeshShape, Topology
from parallel.process_group import init_distributed, shutdown

from ..config import LoopConfig, OptimConfig, ParallelConfig, PrecisionConfig
from ..engines import build_engine
from .flags import model_configs


@contextlib.contextmanager
def distributed():
    """The job torchrun started (or a world of one), left cleanly whatever happens."""
    ctx = init_distributed()
    try:
        yield ctx
    finally:
        shutdown()


def topology(ctx, ep: int = 1) -> Topology:
    """The job's mesh with expert-parallel groups of `ep` ranks (collective)."""
    return Topology.build(MeshShape(ctx.world_size, ep=ep), ctx.device.type)


def build_model(a, device: torch.device, moe: MoEConfig | None = None) -> DecoderLM:
    """The benchmark's DecoderLM from the shape flags; seed --seed: the same weights on every rank."""
    (model_cfg, attention_cfg), = model_configs(a, moe)
    torch.manual_seed(a.seed)
    return DecoderLM(model_cfg, attention_cfg).to(device)


class FixedBatch:
    """This rank's (x, y) of --batch x --seq-len tokens, handed out at every `next_batch`."""

    def __init__(self, a, rank: int, device: torch.device, vocab_size: int = 256):
        g = torch.Generator().manual_seed(a.seed + 1 + rank)
        self.x = torch.randint(0, vocab_size, (a.batch, a.seq_len), generator=g).to(device)
        self.y = torch.randint(0, vocab_size, (a.batch, a.seq_len), generator=g).to(device)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x, self.y


def engine_slices(a, *, parallel: str = "ddp", algorithm: str = "ring", precision: str = "fp32",
                  grad_reduce: str = "fp32", ep_size: int = 1, bucket_mb: float = 25.0) -> dict:
    """The config slices of trainer/config.py an engine is built from: AdamW at a constant
    --lr (no warm-up, no decay), clipping at 1.0, one micro-batch of --batch sequences."""
    return {"parallel": ParallelConfig(name=parallel, algorithm=algorithm, bucket_mb=bucket_mb, ep_size=ep_size),
            "precision": PrecisionConfig(name=precision, grad_reduce=grad_reduce),
            "optim": OptimConfig(lr=a.lr, warmup_steps=0, min_lr_ratio=1.0),
            "loop": LoopConfig(max_steps=a.trials * (a.warmup + a.iters), micro_batch_size=a.batch, grad_accum=1)}


class Contender:
    """One engine (anything with `train_step(batches, step) -> StepResult`) stepping on `batches`:
    counts its steps and keeps its first and last step's results."""

    def __init__(self, engine, batches, comms=None):
        self.engine, self.batches, self.comms = engine, batches, comms
        self.steps, self.first, self.last = 0, None, None

    def __call__(self) -> None:
        """One training step."""
        result = self.engine.train_step(self.batches, self.steps)
        self.steps += 1
        if self.first is None:
            self.first = result
        self.last = result

    def close(self) -> None:
        self.engine.close()
        if self.comms is not None:
            self.comms.close()


def close_all(contenders) -> None:
    """Closes every contender (its engine and communicators)."""
    for c in contenders:
        c.close()


def engine_contender(name: str, model: DecoderLM, comms, a, device: torch.device, batches, **slices) -> Contender:
    """`build_engine(name)` over `model`, which it casts and shards in place (hand it a copy to keep one)."""
    engine = build_engine(name, model=model, comms=comms, device=device, **engine_slices(a, **slices))
    return Contender(engine, batches, comms)


def time_steps(steps: dict[str, Callable[[], object]], a, device: torch.device) -> dict[str, list[float]]:
    """Seconds per step of every case in every trial (a Contender is a step): --trials interleaved
    trials of --warmup + --iters steps each, mean over ranks (parallel/bench/timing.py)."""
    return interleaved(steps, trials=a.trials, warmup=a.warmup, iters=a.iters, device=device)


def mean_over_ranks(values: list[float], group, device: torch.device) -> list[float]:
    """Each value's mean over the ranks of `group` (for reports, after the timing)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, group=group)
    return (t / dist.get_world_size(group)).tolist()


def losses(contenders: dict[str, Contender], group, device: torch.device) -> dict[str, tuple[float, float]]:
    """name -> (first step's loss, last step's loss), each the mean over the ranks of `group`."""
    flat = mean_over_ranks([float(v) for c in contenders.values() for v in (c.first.loss, c.last.loss)], group,
                           device)
    return {n: (flat[2 * i], flat[2 * i + 1]) for i, n in enumerate(contenders)}
