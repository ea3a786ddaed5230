"""`engine=deepspeed`: the same model, data, loop and precision trained by DeepSpeed.

`DeepSpeedEngine` presents the interface the loop uses with ringtrain's own wrappers
(parallel.data_parallel.DataParallel, parallel.zero.ZeroModel), so a comparison changes
nothing but who moves the gradients. Its DeepSpeed config is generated from ringtrain's:
ZeRO stage (ddp -> 0, zeroN -> N), bucket sizes, precision, micro-batch, accumulation,
clipping; the AdamW is the same torch optimizer over the same parameter groups.
DeepSpeed keeps its own communication (torch.distributed collectives), so ringtrain's
`comm_*` metrics do not see its gradient traffic; they are logged as null.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch

from .config import TrainConfig
from .structured import ConfigError


def deepspeed_config(tc: TrainConfig) -> dict:
    """DeepSpeed's JSON config for this run. fp16 settings DeepSpeed cannot express (its
    scale starts at a power of 2 and moves by a factor of 2; its floor is an integer) raise
    ConfigError naming the key rather than training with other settings than asked."""
    if tc.precision.name == "fp16":
        _check_fp16_expressible(tc.precision)
    stage = 0 if tc.parallel.name == "ddp" else int(tc.parallel.name[-1])
    bucket = int(tc.parallel.bucket_mb * 2**20 / 4)  # DeepSpeed counts elements
    return {
        "train_micro_batch_size_per_gpu": tc.trainer.micro_batch_size,
        "gradient_accumulation_steps": tc.trainer.grad_accum,
        "gradient_clipping": tc.optim.grad_clip,
        "zero_optimization": {"stage": stage, "reduce_bucket_size": bucket, "allgather_bucket_size": bucket,
                              "overlap_comm": True, "contiguous_gradients": True},
        "bf16": {"enabled": tc.precision.name == "bf16"},
        # ringtrain's scaler settings in DeepSpeed's terms (its scale moves by a factor of 2)
        "fp16": {"enabled": tc.precision.name == "fp16", "loss_scale": 0,
                 "initial_scale_power": int(round(math.log2(tc.precision.init_scale))),
                 "loss_scale_window": tc.precision.growth_interval, "hysteresis": tc.precision.hysteresis,
                 "consecutive_hysteresis": True, "min_loss_scale": tc.precision.min_scale},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def _check_fp16_expressible(p) -> None:
    power = math.log2(p.init_scale)
    problems = [f"precision.{key}={value:g} ({why})" for bad, key, value, why in (
        (power != round(power), "init_scale", p.init_scale, "DeepSpeed starts at a power of 2"),
        (p.growth_factor != 2.0, "growth_factor", p.growth_factor, "DeepSpeed grows by 2"),
        (p.backoff_factor != 0.5, "backoff_factor", p.backoff_factor, "DeepSpeed backs off by 1/2"),
        (p.min_scale != int(p.min_scale), "min_scale", p.min_scale, "DeepSpeed's floor is an integer"),
    ) if bad]
    if problems:
        raise ConfigError("engine=deepspeed with precision=fp16 cannot express " + "; ".join(problems)
                          + "; use DeepSpeed's values or engine=native")


class DeepSpeedEngine:
    """Adapter: a deepspeed.DeepSpeedEngine behind DataParallel's interface."""

    def __init__(self, model: torch.nn.Module, tc: TrainConfig, make_optimizer, param_groups, comm):
        import deepspeed

        self._ds = deepspeed
        self.stage = 0 if tc.parallel.name == "ddp" else int(tc.parallel.name[-1])
        self.module = model
        self.comm = comm  # ringtrain's, for logging and evaluation only
        self._stage0_norm = None
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=make_optimizer(param_groups), config=deepspeed_config(tc))

    def __call__(self, *args, **kwargs):
        return self.engine(*args, **kwargs)

    def no_sync(self):
        return contextlib.nullcontext()  # DeepSpeed knows the accumulation boundary itself

    def backward(self, loss: torch.Tensor) -> None:
        # the loop already divided by grad_accum; DeepSpeed's step acts only at the boundary
        self.engine.backward(loss, scale_wrt_gas=False)
        if self.stage == 0 and self.engine.is_gradient_accumulation_boundary():
            # stage 0 reports no norm; measure the averaged gradients before step() clears them
            self._stage0_norm = torch.nn.utils.get_total_norm(
                [p.grad for p in self.module.parameters() if p.grad is not None])
        self.engine.step()

    def finish_gradient_sync(self) -> None:
        pass

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        norm = self._stage0_norm if self.stage == 0 else self.engine.get_global_grad_norm()
        return torch.tensor(float("nan") if norm is None else float(norm))  # clipped inside DeepSpeed

    def optimizer_step(self) -> None:
        pass  # done in the last micro-step's backward()

    def zero_grad(self) -> None:
        pass

    def gathered(self):
        if self.stage == 3:
            return self._ds.zero.GatheredParameters(list(self.module.parameters()), modifier_rank=None)
        return contextlib.nullcontext()

    def consolidated_state_dict(self) -> dict | None:
        return _rank0_state(self)

    def loss_scale(self) -> float | None:
        """DeepSpeed's current fp16 loss scale."""
        scale = getattr(self.engine.optimizer, "cur_scale", None) or getattr(self.engine.optimizer, "loss_scale", None)
        return None if scale is None else float(scale)

    def model_state_bytes(self) -> dict[str, int]:
        return {}  # DeepSpeed's partitions are internal; compare peak memory instead

    def save_optimizer(self, ckpt_dir) -> None:
        self.engine.save_checkpoint(str(Path(ckpt_dir) / "deepspeed"), tag="state")

    def load_optimizer(self, ckpt_dir) -> None:
        path = Path(ckpt_dir) / "deepspeed"
        if not path.is_dir():
            raise ValueError(f"trainer.resume: {path} is missing (not a DeepSpeed checkpoint)")
        self.engine.load_checkpoint(str(path), tag="state")


class AccelerateEngine:
    """Adapter: Hugging Face Accelerate (DDP, or FSDP for zero2 / zero3) behind DataParallel's interface.

    ddp -> Accelerate's DistributedDataParallel; zero2 -> FSDP SHARD_GRAD_OP (gradients
    and optimizer states sharded); zero3 -> FSDP FULL_SHARD (parameters too), each
    transformer block one FSDP unit. zero1 has no Accelerate equivalent (refused at
    validation). Accumulation scaling stays the loop's: loss / grad_accum, no_sync on
    the micro-steps before the last.
    """

    def __init__(self, model: torch.nn.Module, tc: TrainConfig, make_optimizer, param_groups, comm):
        from accelerate import Accelerator
        from accelerate.utils import FullyShardedDataParallelPlugin

        self.comm = comm
        self.module = model
        plugin = None
        if tc.parallel.name in ("zero2", "zero3"):
            from torch.distributed.fsdp import ShardingStrategy
            from torch.distributed.fsdp.wrap import ModuleWrapPolicy

            block_type = type(model.blocks[0])
            plugin = FullyShardedDataParallelPlugin(
                sharding_strategy=ShardingStrategy.FULL_SHARD if tc.parallel.name == "zero3"
                else ShardingStrategy.SHARD_GRAD_OP,
                auto_wrap_policy=ModuleWrapPolicy({block_type}), use_orig_params=True, sync_module_states=True)
        self.acc = Accelerator(mixed_precision="no" if tc.precision.name == "fp32" else tc.precision.name,
                               fsdp_plugin=plugin, cpu=not torch.cuda.is_available())
        self.wrapped = self.acc.prepare(model)
        self.fsdp = plugin is not None
        self.optimizer = self.acc.prepare(make_optimizer(param_groups))

    def __call__(self, *args, **kwargs):
        return self.wrapped(*args, **kwargs)

    def no_sync(self):
        return self.acc.no_sync(self.wrapped)

    def backward(self, loss: torch.Tensor) -> None:
        self.acc.backward(loss)

    def finish_gradient_sync(self) -> None:
        pass

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        return self.acc.clip_grad_norm_(self.wrapped.parameters(), max_norm)

    def optimizer_step(self) -> None:
        self.optimizer.step()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad()

    def gathered(self):
        if self.fsdp:
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
            return FSDP.summon_full_params(self.wrapped, writeback=False)
        return contextlib.nullcontext()

    def consolidated_state_dict(self) -> dict | None:
        return _rank0_state(self)

    def loss_scale(self) -> float | None:
        """Accelerate's GradScaler scale (fp16), if it made one."""
        scaler = getattr(self.acc, "scaler", None)
        return None if scaler is None else float(scaler.get_scale())

    def model_state_bytes(self) -> dict[str, int]:
        return {}

    def save_optimizer(self, ckpt_dir) -> None:
        self.acc.save_state(str(Path(ckpt_dir) / "accelerate"))

    def load_optimizer(self, ckpt_dir) -> None:
        path = Path(ckpt_dir) / "accelerate"
        if not path.is_dir():
            raise ValueError(f"trainer.resume: {path} is missing (not an Accelerate checkpoint)")
        self.acc.load_state(str(path))


def _rank0_state(engine) -> dict | None:
    """The engine's full model state on rank 0 (gathered first when sharded)."""
    with engine.gathered():
        if engine.comm.rank != 0:
            return None
        return {k: v.detach().float().clone() if v.is_floating_point() else v.detach().clone()
                for k, v in engine.module.state_dict().items()}
