"""The training run's configuration: one dataclass per config group (configs/<group>/).

`configs/train.yaml` composes these; `load_config` turns Hydra's result into a
validated `TrainConfig` before anything else happens (see trainer/structured.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from omegaconf import DictConfig, OmegaConf

from models.config import AttentionConfig, ModelConfig

from .data.config import DataConfig
from .structured import ConfigError, build


@dataclass
class ParallelConfig:
    """How the model is replicated or sharded across ranks, and how gradients travel."""

    name: Literal["ddp", "zero1", "zero2", "zero3"] = "ddp"
    """ddp (replicated), or ZeRO sharding: zero1 (optimizer states), zero2 (+ gradients), zero3 (+ parameters)."""
    algorithm: Literal["ring", "rhd", "tree", "native"] = "ring"
    """Collective algorithm for gradient all-reduce and parameter broadcast."""
    bucket_mb: float = 25.0
    """Gradient bucket size in MiB."""
    first_bucket_mb: float = 1.0
    """Cap of the first bucket (the last layers' gradients), so communication starts early."""
    find_unused_parameters: bool = False
    """Average parameters that got no gradient as zeros instead of stopping with an error."""
    ep_size: int = 1
    """Expert-parallel group size (ranks that share one set of experts)."""
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    """Process-group backend; auto = nccl with CUDA, else gloo."""
    segment_mb: float = 4.0
    """Pipelining segment of the hand-written collectives, in MiB."""
    window: int = 2
    """Segments in flight in the hand-written collectives (>= 2)."""
    timeout_s: float = 600.0
    """A collective that cannot finish within this many seconds (a rank stuck or gone) stops every
    other rank with one line naming the collective, its sequence number and the missing rank(s)."""

    def validate(self) -> None:
        for k in ("bucket_mb", "first_bucket_mb", "segment_mb", "timeout_s"):
            if getattr(self, k) <= 0:
                raise ValueError(f"parallel.{k} must be > 0, got {getattr(self, k)}")
        if self.ep_size < 1:
            raise ValueError(f"parallel.ep_size must be >= 1, got {self.ep_size}")
        if self.window < 2:
            raise ValueError(f"parallel.window must be >= 2, got {self.window}")


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
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.weight_decay < 0:
            raise ValueError(f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        for k in ("beta1", "beta2"):
            if not 0 <= getattr(self, k) < 1:
                raise ValueError(f"optim.{k} must be in [0, 1), got {getattr(self, k)}")
        if self.grad_clip < 0:
            raise ValueError(f"optim.grad_clip must be >= 0, got {self.grad_clip}")


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
        known = ("trainer.loggers.ConsoleLogger", "trainer.loggers.WandbLogger")
        if self._target_ not in known:
            raise ValueError(f"logger._target_={self._target_!r} is not one of {list(known)}")


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
    """Per-device peak for MFU; None = a table for known GPUs, a measured matmul peak on CPU."""
    progress: bool = True
    """Show a progress bar on rank 0."""
    on_nonfinite: Literal["stop", "skip"] = "stop"
    """fp32/bf16: a non-finite loss or gradient stops the run naming the step and rank(s), or skips that step."""

    def validate(self) -> None:
        for k in ("max_steps", "micro_batch_size", "grad_accum", "log_every", "eval_batches"):
            if getattr(self, k) < 1:
                raise ValueError(f"trainer.{k} must be >= 1, got {getattr(self, k)}")
        for k in ("eval_every", "ckpt_every", "keep_last"):
            if getattr(self, k) < 0:
                raise ValueError(f"trainer.{k} must be >= 0, got {getattr(self, k)}")
        if self.stop_after_steps is not None and self.stop_after_steps < 1:
            raise ValueError(f"trainer.stop_after_steps must be >= 1, got {self.stop_after_steps}")
        if self.peak_tflops is not None and self.peak_tflops <= 0:
            raise ValueError(f"trainer.peak_tflops must be > 0, got {self.peak_tflops}")


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
        from parallel.expert_parallel import check_expert_parallel

        check_expert_parallel(self.model.moe.num_experts, self.parallel.ep_size)  # names both keys
        if self.parallel.ep_size > 1 and self.engine != "native":
            raise ValueError(f"parallel.ep_size={self.parallel.ep_size} (expert parallelism) runs with engine=native; "
                             f"got engine={self.engine} (with parallel.ep_size=1 every engine takes MoE models)")
        if self.engine == "accelerate" and self.parallel.name == "zero1":
            raise ValueError("engine=accelerate with parallel=zero1 does not exist (Accelerate shards "
                             "through FSDP: use parallel=ddp, zero2 or zero3)")
        if self.attention.rope and (self.model.d_model // self.model.n_heads) % 2:
            raise ValueError("attention.rope needs an even head dim (model.d_model / model.n_heads)")


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
