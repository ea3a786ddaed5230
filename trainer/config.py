"""The training run's configuration: one dataclass per config group (configs/<group>/).

`configs/train.yaml` composes these; `load_config` turns Hydra's result into a
validated `TrainConfig` before anything else happens (see trainer/structured.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

import torch
from omegaconf import DictConfig, OmegaConf

from models.config import AttentionConfig, ModelConfig

from .data.config import DataConfig
from .structured import ConfigError, build, require


ZERO_STAGES = {"ddp": 0, "zero1": 1, "zero2": 2, "zero3": 3}


@dataclass
class ParallelConfig:
    """How the model is replicated or sharded across ranks, and how gradients travel."""

    name: Literal["ddp", "zero1", "zero2", "zero3"] = "ddp"
    """ddp (replicated), or ZeRO sharding: zero1 (optimizer states), zero2 (+ gradients), zero3 (+ parameters)."""
    algorithm: Literal["ring", "rhd", "tree", "native", "hier", "auto"] = "ring"
    """Collective algorithm for every gradient and parameter collective: a flat one, hier (two
    levels: inside nodes, then between them), or auto (per op and bucket size, the one measured
    fastest for this job's layout: from parallel.tuning, else a start-up calibration)."""
    tuning: Optional[str] = None
    """A tuning file (`python -m parallel.bench mode=tune` writes DIR/tuning.json) for
    algorithm=auto; one measured for another layout is reported and not used."""
    calibration_s: float = 5.0
    """algorithm=auto without a usable tuning file: seconds of measurement at start-up."""
    bucket_mb: float = 25.0
    """Gradient bucket size in MiB."""
    first_bucket_mb: float = 1.0
    """Cap of the first bucket (the last layers' gradients), so communication starts early."""
    find_unused_parameters: bool = False
    """Average parameters that got no gradient as zeros instead of stopping with an error."""
    ep_size: int = 1
    """Expert-parallel group size (ranks that share one set of experts)."""
    cp_size: int = 1
    """Context-parallel group size: each sequence is split over this many consecutive ranks."""
    cp_softmax: Literal["ring", "allgather"] = "ring"
    """Softmax attention under context parallelism: ring (K/V blocks travel around the cp ring, O(T/K)
    memory) or allgather (every rank gathers the whole sequence's K/V once, O(T) memory; for comparison)."""
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    """Process-group backend; auto = nccl with CUDA, else gloo."""
    segment_mb: float = 4.0
    """Pipelining segment of the hand-written collectives, in MiB."""
    window: int = 2
    """Segments in flight in the hand-written collectives (>= 2)."""
    timeout_s: float = 600.0
    """A collective that cannot finish within this many seconds (a rank stuck or gone) stops every
    other rank with one line naming the collective, its sequence number and the missing rank(s)."""

    @property
    def zero_stage(self) -> int:
        """0 for ddp, N for zeroN."""
        return ZERO_STAGES[self.name]

    def validate(self) -> None:
        for k in ("bucket_mb", "first_bucket_mb", "segment_mb", "timeout_s", "calibration_s"):
            require(getattr(self, k) > 0, f"parallel.{k}", "be > 0", getattr(self, k))
        if self.tuning is not None:
            require(self.algorithm == "auto", "parallel.tuning", "go with parallel.algorithm=auto (it is "
                    f"{self.algorithm!r})", self.tuning)
            from parallel.collectives import TuningTable
            TuningTable.load(self.tuning)  # a damaged file stops here, naming parallel.tuning
        require(self.ep_size >= 1, "parallel.ep_size", "be >= 1", self.ep_size)
        require(self.cp_size >= 1, "parallel.cp_size", "be >= 1", self.cp_size)
        require(self.window >= 2, "parallel.window", "be >= 2", self.window)


@dataclass
class PrecisionConfig:
    """Mixed precision (parallel/precision.py) and fp16's dynamic loss scaling (parallel/loss_scale.py)."""

    name: Literal["fp32", "fp16", "bf16"] = "fp32"
    """fp32; or bf16 / fp16: half parameters and autocast, float32 master weights; fp16 with loss scaling."""
    grad_reduce: Literal["fp32", "half"] = "fp32"
    """dtype of gradient communication and gradient buffers: fp32, or the half type (less traffic and memory)."""
    init_scale: float = 65536.0
    """fp16: initial loss scale (2^16)."""
    growth_factor: float = 2.0
    """fp16: the scale is multiplied by this after growth_interval overflow-free steps."""
    backoff_factor: float = 0.5
    """fp16: the scale is multiplied by this on an overflow (beyond hysteresis)."""
    growth_interval: int = 2000
    """fp16: overflow-free steps before the scale grows."""
    hysteresis: int = 1
    """fp16: consecutive overflows until the scale backs off (1 = every overflow, as torch's GradScaler)."""
    min_scale: float = 1.0
    """fp16: the scale never goes below this."""
    max_scale: float = 16777216.0
    """fp16: the scale never goes above this (2^24)."""
    on_min_scale: Literal["warn", "raise"] = "warn"
    """fp16: an overflow at min_scale warns and goes on, or stops the run."""
    report_overflow: bool = False
    """fp16: on an overflow, log the first parameters whose gradients were not finite (one extra gather)."""

    def validate(self) -> None:
        from parallel.loss_scale import DynamicLossScaler

        DynamicLossScaler(init_scale=self.init_scale, growth_factor=self.growth_factor,
                          backoff_factor=self.backoff_factor, growth_interval=self.growth_interval,
                          hysteresis=self.hysteresis, min_scale=self.min_scale, max_scale=self.max_scale,
                          on_min_scale=self.on_min_scale)  # raises naming precision.<key>


@dataclass
class OptimConfig:
    """AdamW with linear warm-up and cosine decay."""

    name: Literal["adamw"] = "adamw"
    """Optimizer."""
    lr: float = 1e-3
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of lr (cosine floor)."""
    warmup_steps: int = 50
    """Linear warm-up steps from 0 to lr."""
    weight_decay: float = 0.1
    """Decoupled weight decay; never applied to norms, biases and embeddings."""
    beta1: float = 0.9
    """Adam beta1."""
    beta2: float = 0.95
    """Adam beta2."""
    eps: float = 1e-8
    """Adam epsilon."""
    grad_clip: float = 1.0
    """Global gradient-norm clip; 0 disables clipping (the norm is still logged)."""

    def validate(self) -> None:
        require(self.lr > 0, "optim.lr", "be > 0", self.lr)
        require(0 <= self.min_lr_ratio <= 1, "optim.min_lr_ratio", "be in [0, 1]", self.min_lr_ratio)
        require(self.warmup_steps >= 0, "optim.warmup_steps", "be >= 0", self.warmup_steps)
        require(self.weight_decay >= 0, "optim.weight_decay", "be >= 0", self.weight_decay)
        for k in ("beta1", "beta2"):
            require(0 <= getattr(self, k) < 1, f"optim.{k}", "be in [0, 1)", getattr(self, k))
        require(self.grad_clip >= 0, "optim.grad_clip", "be >= 0", self.grad_clip)


@dataclass
class LoggerConfig:
    """Where metrics go besides metrics.jsonl (which is always written)."""

    _target_: str = "trainer.loggers.ConsoleLogger"
    """Logger class: trainer.loggers.ConsoleLogger or trainer.loggers.WandbLogger."""
    project: str = "ringtrain"
    """wandb project."""
    entity: Optional[str] = None
    """wandb entity (team or user); None = your default."""
    mode: Literal["offline", "online", "disabled"] = "offline"
    """wandb mode: offline by default so no network is needed; `wandb sync` uploads later."""
    run_name: Optional[str] = None
    """wandb run name; None = the run directory's name."""
    tags: list[str] = field(default_factory=list)
    """wandb tags."""

    def validate(self) -> None:
        known = ["trainer.loggers.ConsoleLogger", "trainer.loggers.WandbLogger"]
        require(self._target_ in known, "logger._target_", f"be one of {known}", self._target_)


@dataclass
class LoopConfig:
    """The training loop's schedule (`trainer.` on the command line)."""

    max_steps: int = 300
    """Optimizer steps to train for."""
    micro_batch_size: int = 16
    """Sequences per rank per micro-step."""
    grad_accum: int = 1
    """Micro-steps per optimizer step (no communication on all but the last)."""
    eval_every: int = 100
    """Evaluate (val loss, perplexity) every N steps and at the end; 0 = only at the end."""
    eval_batches: int = 10
    """Micro-batches per rank in one evaluation."""
    log_every: int = 10
    """Log metrics every N steps."""
    ckpt_every: int = 0
    """Save a checkpoint every N steps; one is always saved at the end; 0 = only at the end."""
    keep_last: int = 2
    """Completed checkpoints kept on disk (oldest deleted first); 0 keeps all."""
    resume: str = "none"
    """none | auto (latest complete checkpoint in the run directory, if any) | a checkpoint path."""
    stop_after_steps: Optional[int] = None
    """End this launch (with a checkpoint) once this many optimizer steps are done, e.g. to
    fit a Slurm time limit; the schedule still follows max_steps and resume=auto goes on."""
    seed: int = 1337
    """Seed for initialisation and data order (the same on every rank)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto = cuda when available."""
    peak_tflops: Optional[float] = None
    """Per-device peak FLOP/s for MFU; None = a datasheet table for known GPUs, a timed matmul on an
    unknown GPU, and no MFU (null) on a CPU."""
    progress: bool = True
    """Show a progress bar on rank 0."""
    on_nonfinite: Literal["stop", "skip"] = "stop"
    """fp32/bf16: a non-finite loss or gradient stops the run naming the step and rank(s), or skips that step."""
    activation_checkpointing: Literal["none", "full", "selective"] = "none"
    """Recompute activations in backward instead of keeping them: none; full (every decoder block);
    selective (every other block, 0, 2, 4, ...: about half the saving for half the recomputation)."""
    trace_steps: list[int] = field(default_factory=list)
    """[first, last]: trace these optimizer steps (1-based, inclusive; steps past the end are not
    traced) into <run dir>/trace/: a Chrome trace per rank and a PNG of the last traced step
    (trainer/trace.py); [] = off."""

    def validate(self) -> None:
        for k in ("max_steps", "micro_batch_size", "grad_accum", "log_every", "eval_batches"):
            require(getattr(self, k) >= 1, f"trainer.{k}", "be >= 1", getattr(self, k))
        for k in ("eval_every", "ckpt_every", "keep_last"):
            require(getattr(self, k) >= 0, f"trainer.{k}", "be >= 0", getattr(self, k))
        require(self.stop_after_steps is None or self.stop_after_steps >= 1, "trainer.stop_after_steps",
                "be >= 1 or null", self.stop_after_steps)
        require(self.peak_tflops is None or self.peak_tflops > 0, "trainer.peak_tflops", "be > 0 or null",
                self.peak_tflops)
        t = self.trace_steps
        require(not t or (len(t) == 2 and 1 <= t[0] <= t[1]), "trainer.trace_steps",
                "be [] (off) or [first, last] with 1 <= first <= last", t)


@dataclass
class TrainConfig:
    """One training run (configs/train.yaml)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """Model shape."""
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    """Attention variant and its settings."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training data."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Parallelism and collective algorithm."""
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    """Compute precision."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and schedule."""
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    """Metrics logger."""
    trainer: LoopConfig = field(default_factory=LoopConfig)
    """Loop settings."""
    engine: Literal["native", "deepspeed", "accelerate"] = "native"
    """Who trains: native (ringtrain's DDP / ZeRO), deepspeed (DeepSpeed ZeRO at the same stage)
    or accelerate (Accelerate's DDP, or FSDP for zero2 / zero3), for comparison."""

    def validate(self) -> None:
        """Checks across groups; each group's own fields were checked by its validate()."""
        ep, experts = self.parallel.ep_size, self.model.moe.num_experts
        if ep > 1 and experts < 1:
            raise ValueError(f"parallel.ep_size={ep} needs MoE layers; model.moe.num_experts is {experts}")
        if experts % ep:
            raise ValueError(f"model.moe.num_experts={experts} must be divisible by parallel.ep_size={ep}")
        cp = self.parallel.cp_size
        if cp > 1:
            if ep > 1:
                raise ValueError(f"parallel.cp_size={cp} with parallel.ep_size={ep}: context and expert parallelism "
                                 "do not compose yet; use one of them")
            if experts > 0:
                raise ValueError(f"parallel.cp_size={cp} with model.moe.num_experts={experts}: MoE routing capacity "
                                 "and its load-balancing loss are computed per rank's tokens, so a split sequence "
                                 "would route differently; use a dense model with context parallelism")
            from parallel.context_parallel import check_context_parallel

            a = self.attention
            check_context_parallel(cp_size=cp, seq_len=self.model.seq_len, kind=a.kind, chunk_size=a.chunk_size,
                                   block_size=a.block_size, diag_layers=a.diag_layer_count(self.model.n_layers))
        from .engines import check_config  # what the chosen engine cannot run, in its own module

        check_config(self, cuda=torch.cuda.is_available())
        self.model.validate(self.attention)  # the model / attention pair (RoPE head dim, GAU without MLP)


def check_launch(tc: TrainConfig, *, world_size: int, cuda: bool) -> None:
    """What the config asks of this machine and launch, checked before any process group:
    raises ConfigError naming the keys and values."""
    want_cuda = uses_cuda(tc, cuda)
    problems = [
        (tc.trainer.device == "cuda" and not cuda, "trainer.device=cuda but no CUDA device is visible"),
        (tc.parallel.backend == "nccl" and not want_cuda,
         "parallel.backend=nccl needs CUDA GPUs (trainer.device cuda or auto with a GPU visible); use gloo or auto"),
        (world_size % tc.parallel.ep_size != 0,
         f"parallel.ep_size={tc.parallel.ep_size} must divide the world size {world_size}"),
        (world_size % tc.parallel.cp_size != 0,
         f"parallel.cp_size={tc.parallel.cp_size} must divide the world size {world_size}"),
    ]
    for bad, message in problems:
        if bad:
            raise ConfigError(message)


def uses_cuda(tc: TrainConfig, cuda: bool) -> bool:
    """Whether this run trains on GPUs (trainer.device, with auto = cuda when one is visible)."""
    return tc.trainer.device == "cuda" or (tc.trainer.device == "auto" and cuda)


def load_config(cfg: DictConfig | dict) -> TrainConfig:
    """Hydra's composed config -> a validated TrainConfig (raises ValueError naming the key)."""
    try:
        data = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
        data.pop("hydra", None)
        return build(TrainConfig, data)
    except ConfigError:
        raise
    except ValueError as e:  # every validate() raises ValueError naming its key
        raise ConfigError(str(e)) from None
