"""Training entry point: `[torchrun ...] python -m trainer.train [overrides]`.

`main` is Hydra's and only calls `train(cfg)`, which is importable and testable. Order of
business: validate the whole config and the data's size (before any process group exists),
join the job, build the mesh and its communicators, the data shards and the model, restore
the model from a checkpoint if asked, build the engine (which parallelizes the model),
restore the engine's state, then run the loop's components, and always leave the process
group cleanly.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
from pathlib import Path

import hydra
import torch
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from models.transformer import DecoderLM
from parallel.collectives import CollectiveTimeout, Tuning, TuningTable
from parallel.mesh import MeshShape, Topology
from parallel.process_group import abort_process, init_distributed, shutdown

from . import loop
from .checkpoint import CheckpointManager, EngineState, resolve_resume
from .collective_plan import plan_collectives
from .config import TrainConfig, check_launch, load_config, uses_cuda
from .data import ShardedBatches, TokenData, check_split_sizes, load_tokens
from .engines import NonFiniteLossError, build_engine
from .loggers import MetricsFile, build_logger
from .mfu import peak_flops
from .structured import ConfigError, schema_of

log = logging.getLogger("ringtrain.train")

ConfigStore.instance().store(name="train_schema", node=schema_of(TrainConfig))


def _run_dir() -> Path:
    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    return Path(os.environ.get("RINGTRAIN_RUN_DIR", "runs/train/untitled"))


def check_config(cfg: DictConfig | TrainConfig, run_dir: Path) -> TrainConfig:
    """Everything about the config that can be checked before a process group exists: the typed
    config, what it asks of this machine and launch, and the resume path. Raises ConfigError."""
    tc = cfg if isinstance(cfg, TrainConfig) else load_config(cfg)
    check_launch(tc, world_size=int(os.environ.get("WORLD_SIZE", "1")), cuda=torch.cuda.is_available())
    if tc.trainer.resume not in ("none", "auto"):
        resolve_resume(tc.trainer.resume, run_dir / "checkpoints")
    return tc


def load_checked_data(tc: TrainConfig) -> TokenData:
    """The run's tokens, checked against the model and the launch before any process group."""
    try:
        tokens = load_tokens(tc.data)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if tokens.vocab_size > tc.model.vocab_size:
        raise ConfigError(f"model.vocab_size={tc.model.vocab_size} is smaller than the data's "
                          f"vocabulary ({tokens.vocab_size}, {tc.data.kind})")
    try:  # names model.seq_len, trainer.micro_batch_size and data.val_fraction
        check_split_sizes(len(tokens.train), len(tokens.val), seq_len=tc.model.seq_len,
                          micro_batch_size=tc.trainer.micro_batch_size,
                          dp_size=int(os.environ.get("WORLD_SIZE", 1)) // tc.parallel.cp_size)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return tokens


def train(cfg: DictConfig | TrainConfig, run_dir: str | Path | None = None) -> dict:
    """Trains as `cfg` says; returns the last logged metrics record."""
    run_dir = Path(run_dir) if run_dir is not None else _run_dir()
    tc = check_config(cfg, run_dir)  # fails here, before any process group
    tokens = load_checked_data(tc)
    backend = tc.parallel.backend if uses_cuda(tc, torch.cuda.is_available()) else "gloo"
    ctx = init_distributed(backend, timeout_s=tc.parallel.timeout_s)
    try:
        return _run(tc, tokens, run_dir, ctx)
    except CollectiveTimeout as e:
        # a stuck gloo receive cannot be cancelled, so a clean shutdown would wait for the
        # process group's own timeout: print the one line and leave now
        abort_process(str(e))
    finally:
        shutdown()


def _run(tc: TrainConfig, tokens: TokenData, run_dir: Path, ctx) -> dict:
    _quiet_other_ranks(ctx.rank)
    run_dir.mkdir(parents=True, exist_ok=True)
    p = tc.parallel
    topology = Topology.build(MeshShape(ctx.world_size, ep=p.ep_size, cp=p.cp_size), ctx.device.type)
    table = TuningTable.load(p.tuning) if p.tuning is not None else None  # checked before the process group
    if table is not None and ctx.rank == 0:
        why = table.mismatch(world_size=ctx.world_size, layout=topology.layout, backend=ctx.backend)
        if why is not None:
            log.warning(f"parallel.tuning={p.tuning} is not used: {why}; calibrating at start-up instead")
    comms = topology.communicators(algorithm=p.algorithm, timeout_s=p.timeout_s, table=table,
                                   tuning=Tuning(segment_bytes=int(p.segment_mb * 2**20), window=p.window))
    # every data-parallel replica reads its own shard of the data; the ranks of a cp group read the same
    batches = ShardedBatches(tokens.train, seq_len=tc.model.seq_len, micro_batch_size=tc.trainer.micro_batch_size,
                             dp_rank=topology.data_rank, dp_size=topology.data_size, seed=tc.trainer.seed)
    torch.manual_seed(tc.trainer.seed)  # the same weights on every rank (rank 0's are broadcast anyway)
    model = DecoderLM(tc.model, tc.attention).to(ctx.device)
    manager = CheckpointManager(run_dir / "checkpoints", rank=ctx.rank, world_size=ctx.world_size,
                                keep_last=tc.trainer.keep_last,
                                layout={"engine": tc.engine, "parallel": p.name, "ep_size": p.ep_size})
    resume = resolve_resume(tc.trainer.resume, run_dir / "checkpoints")
    # the model's weights are loaded before the engine wraps (and shards) it
    restored = manager.load(resume, model=model, device=ctx.device, verify_files=tc.trainer.resume != "auto") \
        if resume is not None else None
    engine = build_engine(tc.engine, model=model, comms=comms, parallel=p, precision=tc.precision, optim=tc.optim,
                          loop=tc.trainer, device=ctx.device)
    try:
        if getattr(engine, "wrapper", None) is not None:  # the native engine: ringtrain's collectives
            plan_collectives(engine.wrapper, comms, calibration_s=p.calibration_s, device=ctx.device,
                             run_dir=run_dir, rank=ctx.rank)
        if restored is not None:
            template = engine.sharded_template()
            manager.load_sharded(restored.path, template)  # ZeRO: resharded to this world size by DCP
            engine.load_state_dict(EngineState(sharded=template, local=restored.rank_state["engine"]))
            sampler = restored.rank_state["sampler"]  # another cp_size on as many ranks: another dp_size
            batches.load_state_dict(sampler, reshard=restored.resharded or sampler.get("dp_size") != batches.dp_size)
        return _loop(tc, tokens, run_dir, ctx, engine, batches, manager, comms, restored, topology)
    finally:
        engine.close()
        comms.close()


def _loop(tc: TrainConfig, tokens: TokenData, run_dir: Path, ctx, engine, batches, manager, comms, restored,
          topology: Topology) -> dict:
    """The loop's components around the engine's step; rank 0 logs and writes metrics."""
    t = tc.trainer
    start = restored.step if restored is not None else 0
    end = t.max_steps if t.stop_after_steps is None else min(t.max_steps, t.stop_after_steps)
    peak, peak_src = peak_flops(ctx.device, bf16=tc.precision.name != "fp32", override_tflops=t.peak_tflops)
    info = loop.RunInfo(t, tc.model.seq_len, ctx.device, topology.data_rank, topology.data_size,
                        engine.model.flops_per_token(tc.model.seq_len), peak, rank=ctx.rank, world_size=ctx.world_size)
    sinks, closers = (), []
    if ctx.rank == 0:
        resolved = dataclasses.asdict(tc)
        OmegaConf.save(OmegaConf.create(resolved), run_dir / "config.yaml")
        metrics_file = MetricsFile(run_dir, resumed_at=start if restored is not None else None)
        logger = build_logger(tc.logger, run_dir=run_dir, config=resolved)
        sinks, closers = (metrics_file.write, logger.log), [metrics_file, logger]
        log.info(f"run dir {run_dir} | {ctx.world_size} rank(s), {ctx.backend}, {ctx.device} | "
                 f"model {engine.model.num_params(non_embedding=True) / 1e6:.2f}M non-embedding params, "
                 f"attention {tc.attention.kind} | data {tokens.description}: {len(tokens.train):,} train tokens | "
                 f"{engine.describe()} | "
                 + (f"peak {peak / 1e12:.2f} TFLOP/s ({peak_src})" if peak else f"peak {peak_src}")
                 + (f" | resumed from {restored.path} at step {start}" if restored is not None else ""))
    metrics = loop.Metrics(engine, comms.dp, info, loop.Validator(engine, tokens.val, comms.dp, info),
                           ep_comm=comms.ep, cp_comm=comms.cp, sinks=sinks)
    progress = loop.Progress(metrics, total=t.max_steps, initial=start, enabled=t.progress and ctx.rank == 0)
    components = [metrics, loop.Checkpointing(manager, engine, batches, every=t.ckpt_every, end=end,
                                              metrics=metrics), progress]
    if t.trace_steps:  # first, so the metrics' and validator's collectives fall outside the traced step
        components.insert(0, loop.Tracing(engine, info, run_dir, end=end))
    try:
        loop.run(engine, batches, components, start=start, end=end)
    finally:
        progress.close()
        for c in closers:
            c.close()
    return metrics.last


def _quiet_other_ranks(rank: int) -> None:
    """Rank 0 alone writes the run directory's log and prints."""
    if rank == 0:
        return
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.setLevel(logging.WARNING)


@hydra.main(config_path="../configs", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        train(cfg)
    except (ConfigError, NonFiniteLossError) as e:  # one line, no traceback
        if int(os.environ.get("RANK", "0")) == 0:  # every rank fails alike; one says so
            kind = "config error" if isinstance(e, ConfigError) else "stopped"
            print(f"ringtrain: {kind}: {e}", file=sys.stderr, flush=True)
        else:
            time.sleep(1.0)  # torchrun stops all ranks when one exits: let rank 0 say it first
        sys.exit(2 if isinstance(e, ConfigError) else 3)


if __name__ == "__main__":
    main()
    # The run is over and its files are closed. Skip the interpreter's teardown of torch's modules,
    # which costs 1-2 s per process on a small CPU: every rank of every launch pays it.
    abort_process(None, exit_code=0)
