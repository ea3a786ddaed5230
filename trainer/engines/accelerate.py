"""`engine=accelerate`: Hugging Face Accelerate (DDP, or FSDP for zero2 / zero3), for comparison.

ddp -> Accelerate's DistributedDataParallel; zero2 -> FSDP SHARD_GRAD_OP (gradients and
optimizer states sharded); zero3 -> FSDP FULL_SHARD (parameters too), each transformer
block one FSDP unit. zero1 has no Accelerate equivalent (refused at validation), and
Accelerate runs FSDP on GPUs only. Accumulation scaling stays ringtrain's: loss / grad_accum,
no_sync on the micro-steps before the last; the schedule is the same function.

Checkpoints: the optimizer's state through torch.distributed.checkpoint.state_dict (keyed by
parameter name; FSDP hands sharded tensors over), its tensors saved through DCP like the
native engine's; the fp16 GradScaler's state (GPU) as per-rank plain values.
"""

from __future__ import annotations

import contextlib
import math

import torch

from parallel.data_parallel import broadcast_module_state
from parallel.mesh import Comms
from parallel.precision import PrecisionPolicy

from ..checkpoint import EngineState
from ..config import LoopConfig, OptimConfig, ParallelConfig, PrecisionConfig, uses_cuda
from ..optim import adamw_factory, lr_at, set_lr
from . import StepResult


def check(tc, *, cuda: bool) -> None:
    """What this engine cannot run, refused before any process group (ValueError naming the keys)."""
    if tc.parallel.ep_size > 1:
        raise ValueError(f"parallel.ep_size={tc.parallel.ep_size} (expert parallelism) runs with engine=native; "
                         "got engine=accelerate (with parallel.ep_size=1 every engine takes MoE models)")
    if tc.parallel.name == "zero1":
        raise ValueError("engine=accelerate with parallel=zero1 does not exist (Accelerate shards "
                         "through FSDP: use parallel=ddp, zero2 or zero3)")
    if tc.parallel.name != "ddp" and not uses_cuda(tc, cuda):
        raise ValueError(f"engine=accelerate with parallel={tc.parallel.name} runs Accelerate's FSDP, which needs "
                         "a GPU (Accelerate refuses FSDP on CPU); use parallel=ddp here")


class AccelerateEngine:
    """An Accelerator-prepared model and optimizer behind ringtrain's Engine interface."""

    def __init__(self, *, model, comms: Comms, parallel: ParallelConfig, precision: PrecisionConfig,
                 optim: OptimConfig, loop: LoopConfig, device: torch.device):
        from accelerate import Accelerator
        from accelerate.utils import FullyShardedDataParallelPlugin

        self.model, self.comms, self.device = model, comms, device
        self.parallel_name, self.precision_name = parallel.name, precision.name
        self.policy = PrecisionPolicy.from_name(precision.name, grad_reduce=precision.grad_reduce)
        self.optim_cfg, self.max_steps, self.grad_accum = optim, loop.max_steps, loop.grad_accum
        self.clip = optim.grad_clip if optim.grad_clip > 0 else math.inf
        broadcast_module_state(model, comms)  # rank 0's weights, as the native engine starts from
        plugin = None
        if parallel.name in ("zero2", "zero3"):
            from torch.distributed.fsdp import ShardingStrategy
            from torch.distributed.fsdp.wrap import ModuleWrapPolicy

            plugin = FullyShardedDataParallelPlugin(
                sharding_strategy=ShardingStrategy.FULL_SHARD if parallel.name == "zero3"
                else ShardingStrategy.SHARD_GRAD_OP,
                auto_wrap_policy=ModuleWrapPolicy({type(model.blocks[0])}), use_orig_params=True,
                sync_module_states=True)
        self.fsdp = plugin is not None
        self.acc = Accelerator(mixed_precision="no" if precision.name == "fp32" else precision.name,
                               fsdp_plugin=plugin, cpu=not torch.cuda.is_available())
        groups = model.param_groups(optim.weight_decay)
        self.wrapped = self.acc.prepare(model)
        self.optimizer = self.acc.prepare(adamw_factory(optim)(groups))

    def train_step(self, batches, step: int) -> StepResult:
        lr = lr_at(step, self.optim_cfg, self.max_steps)
        set_lr(self.optimizer, lr)
        self.model.set_step(step)
        loss_sum = torch.zeros((), device=self.device)
        for micro in range(self.grad_accum):
            x, y = batches.next_batch()
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            last = micro == self.grad_accum - 1
            with (contextlib.nullcontext() if last else self.acc.no_sync(self.wrapped)):
                with self.policy.autocast(self.device):
                    _, loss = self.wrapped(x, y)
                self.acc.backward(loss * (1.0 / self.grad_accum))
            loss_sum += loss.detach()
        norm = self.acc.clip_grad_norm_(self.wrapped.parameters(), self.clip)
        self.optimizer.step()
        self.optimizer.zero_grad()
        return StepResult(loss_sum / self.grad_accum, norm, lr)

    def eval_loss(self, x, y):
        with self.policy.autocast(self.device):
            _, loss = self.wrapped(x.to(self.device), y.to(self.device))
        return loss

    def _gathered(self):
        if self.fsdp:
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
            return FSDP.summon_full_params(self.wrapped, writeback=False)
        return contextlib.nullcontext()

    def _optimizer_state(self) -> dict:
        """The optimizer's state tensors keyed `<parameter name>.<key>` (created first if still empty)."""
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        nested = get_optimizer_state_dict(self.wrapped, self.optimizer.optimizer)
        return {f"{name}.{key}": t for name, state in nested["state"].items() for key, t in state.items()
                if torch.is_tensor(t)}

    def state_dict(self) -> EngineState:
        with self._gathered():
            model = None if self.comms.dp.rank != 0 else {
                k: v.detach().float().clone() if v.is_floating_point() else v.detach().clone()
                for k, v in self.model.state_dict().items()}
        scaler = getattr(self.acc, "scaler", None)
        return EngineState(model=model, sharded=self._optimizer_state(),
                           local={"grad_scaler": scaler.state_dict() if scaler is not None else None})

    def sharded_template(self) -> dict:
        return self._optimizer_state()

    def load_state_dict(self, state: EngineState) -> None:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

        current = get_optimizer_state_dict(self.wrapped, self.optimizer.optimizer)
        for name, entry in current["state"].items():
            for key in list(entry):
                if f"{name}.{key}" in state.sharded:
                    entry[key] = state.sharded[f"{name}.{key}"]
        set_optimizer_state_dict(self.wrapped, self.optimizer.optimizer, current)
        scaler = getattr(self.acc, "scaler", None)
        if scaler is not None and state.local.get("grad_scaler"):
            scaler.load_state_dict(state.local["grad_scaler"])

    def model_state_bytes(self) -> dict[str, int]:
        return {}

    def metrics(self) -> dict:
        scaler = getattr(self.acc, "scaler", None)
        return {"loss_scale": float(scaler.get_scale())} if scaler is not None else {}

    def comm_stats(self):
        return None

    def describe(self) -> str:
        return f"engine accelerate, {self.parallel_name}, {self.precision_name}"

    def close(self) -> None:
        pass
