"""Training entry point: `[torchrun ...] python -m trainer.train [overrides]`.

`main` is Hydra's; all the work is in `train(cfg)`, importable and testable.
Order of business: validate the whole config (before any process group exists),
join the job, load data, build the model, apply parallelisms, build the optimizer,
resume if asked, loop, and always leave the process group cleanly.
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
from parallel.collectives import CollectiveTimeout, Communicator, Tuning
from parallel.data_parallel import apply_ddp, broadcast_module_state
from parallel.expert_parallel import apply_expert_parallel
from parallel.precision import PrecisionPolicy, build_loss_scaler
from parallel.process_group import abort_process, init_distributed, shutdown
from parallel.topology import Topology
from parallel.zero import apply_zero

from . import checkpoint
from .config import TrainConfig, load_config
from .structured import ConfigError
from .engines import AccelerateEngine, DeepSpeedEngine
from .data import ShardedBatches, eval_batches, load_tokens
from .loggers import MetricsFile, build_logger
from .loop import NonFiniteLossError, RunState, run
from .mfu import peak_flops
from .optim import adamw_factory
from .structured import schema_of

log = logging.getLogger("ringtrain.train")

ConfigStore.instance().store(name="train_schema", node=schema_of(TrainConfig))


def _quiet_other_ranks(rank: int) -> None:
    """Rank 0 alone writes the run directory's log and prints."""
    if rank == 0:
        return
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.setLevel(logging.WARNING)


def _run_dir() -> Path:
    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    return Path(os.environ.get("RINGTRAIN_RUN_DIR", "runs/train/untitled"))


def check_config(cfg: DictConfig | TrainConfig, run_dir: Path) -> TrainConfig:
    """Everything that can be checked before a process group exists: the typed config and
    what it asks of this machine and launch. Raises ConfigError naming the key and value."""
    tc = cfg if isinstance(cfg, TrainConfig) else load_config(cfg)
    cuda = torch.cuda.is_available()
    want_cuda = tc.trainer.device == "cuda" or (tc.trainer.device == "auto" and cuda)
    world = int(os.environ.get("WORLD_SIZE", "1"))  # torchrun sets it
    problems = [
        (tc.trainer.device == "cuda" and not cuda, "trainer.device=cuda but no CUDA device is visible"),
        (tc.parallel.backend == "nccl" and not want_cuda,
         "parallel.backend=nccl needs CUDA GPUs (trainer.device cuda or auto with a GPU visible); use gloo or auto"),
        (tc.engine == "accelerate" and tc.parallel.name != "ddp" and not want_cuda,
         f"engine=accelerate with parallel={tc.parallel.name} runs Accelerate's FSDP, which needs a GPU "
         "(Accelerate refuses FSDP on CPU); use parallel=ddp here"),
        (tc.engine == "deepspeed" and tc.precision.name == "fp16" and not want_cuda,
         "engine=deepspeed with precision=fp16 needs a GPU (DeepSpeed's CPU accelerator has no fp16); "
         "use precision=bf16, or engine=native for fp16 with loss scaling on CPU"),
    ]
    for bad, message in problems:
        if bad:
            raise ConfigError(message)
    try:
        Topology.validate(world, tc.parallel.ep_size)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if tc.trainer.resume not in ("none", "auto"):
        _resume_path(tc.trainer.resume, run_dir)
    return tc


def train(cfg: DictConfig | TrainConfig, run_dir: str | Path | None = None) -> dict:
    """Trains as `cfg` says; returns the last logged metrics record."""
    run_dir = Path(run_dir) if run_dir is not None else _run_dir()
    tc = check_config(cfg, run_dir)  # fails here, before any process group
    resolved = dataclasses.asdict(tc)
    want_cuda = tc.trainer.device == "cuda" or (tc.trainer.device == "auto" and torch.cuda.is_available())
    backend = tc.parallel.backend if want_cuda else "gloo"
    ctx = init_distributed(backend, timeout_s=tc.parallel.timeout_s)
    try:
        return _train(tc, resolved, run_dir, ctx)
    except CollectiveTimeout as e:
        # a stuck gloo receive cannot be cancelled, so a clean shutdown would wait for the
        # process group's own timeout: print the one line and leave now
        abort_process(str(e))
    finally:
        shutdown()


def _train(tc: TrainConfig, resolved: dict, run_dir: Path, ctx) -> dict:
    _quiet_other_ranks(ctx.rank)
    run_dir.mkdir(parents=True, exist_ok=True)
    topo = Topology.build(ep_size=tc.parallel.ep_size)
    device = ctx.device

    # data: every rank reads its own shard; the token file is built once (file lock)
    tokens = load_tokens(tc.data)
    if tokens.vocab_size > tc.model.vocab_size:
        raise ConfigError(f"model.vocab_size={tc.model.vocab_size} is smaller than the data's "
                         f"vocabulary ({tokens.vocab_size}, {tc.data.kind})")
    # fails now (naming data.val_fraction) rather than at the first evaluation
    eval_batches(tokens.val, seq_len=tc.model.seq_len, micro_batch_size=tc.trainer.micro_batch_size,
                 dp_rank=topo.dp_rank, dp_size=topo.dp_size, max_batches=1)
    batches = ShardedBatches(tokens.train, seq_len=tc.model.seq_len, micro_batch_size=tc.trainer.micro_batch_size,
                             dp_rank=topo.dp_rank, dp_size=topo.dp_size, seed=tc.trainer.seed)

    # model: same seed on every rank, and rank 0's weights are broadcast anyway
    torch.manual_seed(tc.trainer.seed)
    model = DecoderLM(tc.model, tc.attention).to(device)
    resume = _resume_path(tc.trainer.resume, run_dir)
    start_step, rank_state, skipped_nonfinite = 0, None, 0
    if resume is not None:
        start_step, rank_state, resharded = checkpoint.load(resume, model=model, rank=ctx.rank,
                                                            world_size=ctx.world_size, device=device,
                                                            parallel=tc.parallel.name, ep_size=tc.parallel.ep_size,
                                                            verify_files=tc.trainer.resume != "auto")

    # parallelisms, in the order they must compose: expert parallelism first keeps this
    # rank's slice of every MoE layer's experts (all ranks built the same full set);
    # then data parallelism replicates the dense weights over all ranks and each slice
    # of experts over the ranks that hold it (Topology.expert_dp)
    tuning = Tuning(segment_bytes=int(tc.parallel.segment_mb * 2**20), window=tc.parallel.window)
    comm = Communicator(topo.dp, algorithm=tc.parallel.algorithm, tuning=tuning, timeout_s=tc.parallel.timeout_s)
    ep_comm = expert_comm = None
    experts: list = []
    if tc.parallel.ep_size > 1:
        ep_comm = apply_expert_parallel(model, topo.ep, comm=Communicator(
            topo.ep, algorithm=tc.parallel.algorithm, tuning=tuning, timeout_s=tc.parallel.timeout_s))
        expert_comm = Communicator(topo.expert_dp, algorithm=tc.parallel.algorithm, tuning=tuning,
                                   timeout_s=tc.parallel.timeout_s)
        experts = model.expert_parameters()
    groups = model.param_groups(tc.optim.weight_decay)
    # half parameters in compute, float32 masters inside the wrapper; gradients travel in reduce_dtype
    policy = PrecisionPolicy.from_name(tc.precision.name, grad_reduce=tc.precision.grad_reduce)
    mp = {"param_dtype": policy.param_dtype, "reduce_dtype": policy.reduce_dtype}
    if tc.engine != "native":  # a comparison engine moves the gradients
        broadcast_module_state(model, comm)
        engine_cls = DeepSpeedEngine if tc.engine == "deepspeed" else AccelerateEngine
        ddp = engine_cls(model, tc, adamw_factory(tc.optim), groups, comm)
    elif tc.parallel.name == "ddp":
        ddp = apply_ddp(model, topo.dp, bucket_mb=tc.parallel.bucket_mb, first_bucket_mb=tc.parallel.first_bucket_mb,
                        find_unused_parameters=tc.parallel.find_unused_parameters, comm=comm,
                        expert_params=experts, expert_comm=expert_comm, ep_comm=ep_comm, **mp)
    else:
        ddp = apply_zero(model, topo.dp, stage=int(tc.parallel.name[-1]), param_groups=groups,
                         bucket_mb=tc.parallel.bucket_mb, blocks=list(model.blocks), comm=comm,
                         expert_params=experts, expert_comm=expert_comm, ep_comm=ep_comm, **mp)
    optimizer = ddp.optimizer if tc.engine != "native" else ddp.build_optimizer(adamw_factory(tc.optim), groups)
    scaler = build_loss_scaler(policy, tc.precision) if tc.engine == "native" else None
    if resume is not None:
        try:
            ddp.load_optimizer(resume)  # ZeRO: resharded to this world size by DCP
        except ValueError as e:  # a missing or foreign shard: the message names trainer.resume
            raise ConfigError(str(e)) from None
        batches.load_state_dict(rank_state["sampler"], reshard=resharded)
        if scaler is not None and rank_state.get("loss_scaler"):
            scaler.load_state_dict(rank_state["loss_scaler"])
        skipped_nonfinite = rank_state.get("skipped_nonfinite", 0)

    peak, peak_src = peak_flops(device, bf16=policy.mixed, override_tflops=tc.trainer.peak_tflops)
    metrics_file = logger = None
    if ctx.rank == 0:
        OmegaConf.save(OmegaConf.create(resolved), run_dir / "config.yaml")
        metrics_file = MetricsFile(run_dir, resumed_at=start_step if resume is not None else None)
        logger = build_logger(tc.logger, run_dir=run_dir, config=resolved)
        n_params = model.num_params(non_embedding=True)
        log.info(f"run dir {run_dir} | {ctx.world_size} rank(s), {ctx.backend}, {device} | "
                 f"model {n_params / 1e6:.2f}M non-embedding params, attention {tc.attention.kind} | "
                 f"data {tokens.description}: {len(tokens.train):,} train tokens | "
                 f"engine {tc.engine}, {tc.parallel.name}, {tc.precision.name}"
                 + (f" over {comm.algorithm_for('all_reduce')}" if tc.engine == "native" else "") + " | "
                 f"peak {peak / 1e12:.2f} TFLOP/s ({peak_src})"
                 + (f" | resumed from {resume} at step {start_step}" if resume is not None else ""))
    state = RunState(tc, ddp, optimizer, batches, tokens.val, device, topo.dp_rank, topo.dp_size, run_dir,
                     model.flops_per_token(tc.model.seq_len), peak, metrics_file, logger, policy, scaler, ep_comm,
                     skipped_nonfinite)
    try:
        record = run(state, start_step)
    finally:
        for c in (comm, ep_comm, expert_comm):
            if c is not None:
                c.close()
        if ctx.rank == 0:
            metrics_file.close()
            logger.close()
    return record


def _resume_path(resume: str, run_dir: Path) -> Path | None:
    if resume == "none":
        return None
    if resume == "auto":
        return checkpoint.latest(run_dir / "checkpoints")
    path = Path(resume)
    if not (path / "meta.json").is_file():
        raise ConfigError(f"trainer.resume={resume!r} is not a complete checkpoint directory")
    return path


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
