"""`engine=deepspeed`: the same model, data, loop and precision trained by DeepSpeed, for comparison.

The DeepSpeed config is generated from ringtrain's (`deepspeed_config`): ZeRO stage (ddp -> 0,
zeroN -> N), bucket sizes, precision, micro-batch, accumulation, clipping; the optimizer is
the same torch AdamW over the same parameter groups, the schedule the same function.
DeepSpeed moves the gradients with torch.distributed's collectives, so ringtrain's `comm_*`
metrics do not see them (logged as null).

Two settings do not carry over exactly, and the start-up log line says so:
- bucket sizes: DeepSpeed counts elements and needs them to be a multiple of its start
  alignment (2), so `parallel.bucket_mb` is converted to elements and rounded up to even;
- the fp16 loss scale: DeepSpeed 0.19's dynamic scaler grows after `loss_scale_window + 1`
  clean steps the first time (after the start or an overflow) and every `loss_scale_window`
  steps after that, while torch's GradScaler and ringtrain grow every `growth_interval`; no
  window matches both, so with precision=fp16 the scale (and hence the trajectory) drifts
  from the native engine's at every growth. `growth_interval` is passed as the window.

Checkpoints: DeepSpeed's optimizer state_dict (this rank's partition: fp32 master weights,
the torch optimizer's state, its loss scaler) is handed to the checkpointer as per-rank
state, encoded into tensors and plain types (`encode` / `decode`, with an allow-list of the
few DeepSpeed classes it holds), so it loads with weights_only=True. A DeepSpeed checkpoint
resumes at the same world size only.
"""

from __future__ import annotations

import contextlib
import enum
import importlib
import inspect
import math

import torch

from parallel.data_parallel import broadcast_module_state
from parallel.mesh import Comms
from parallel.precision import PrecisionPolicy

from ..checkpoint import EngineState
from ..config import LoopConfig, OptimConfig, ParallelConfig, PrecisionConfig, uses_cuda
from ..optim import adamw_factory, lr_at, set_lr
from ..structured import ConfigError
from . import StepResult

ALIGNMENT = 2
"""DeepSpeed's nccl_start_alignment_factor: bucket sizes (in elements) must be multiples of it."""


def _elements(mb: float) -> int:
    n = int(mb * 2**20 / 4)  # DeepSpeed counts elements
    return max(ALIGNMENT, -(-n // ALIGNMENT) * ALIGNMENT)


def deepspeed_config(parallel: ParallelConfig, precision: PrecisionConfig, optim: OptimConfig, loop: LoopConfig) -> dict:
    """DeepSpeed's JSON config for this run (see the module docstring for what does not carry over)."""
    bucket = _elements(parallel.bucket_mb)
    return {
        "train_micro_batch_size_per_gpu": loop.micro_batch_size,
        "gradient_accumulation_steps": loop.grad_accum,
        "gradient_clipping": optim.grad_clip,
        "zero_optimization": {"stage": parallel.zero_stage, "reduce_bucket_size": bucket,
                              "allgather_bucket_size": bucket, "overlap_comm": True, "contiguous_gradients": True},
        "bf16": {"enabled": precision.name == "bf16"},
        # ringtrain's scaler settings in DeepSpeed's terms (its scale moves by a factor of 2)
        "fp16": {"enabled": precision.name == "fp16", "loss_scale": 0,
                 "initial_scale_power": int(round(math.log2(precision.init_scale))),
                 "loss_scale_window": precision.growth_interval, "hysteresis": precision.hysteresis,
                 "consecutive_hysteresis": True, "min_loss_scale": precision.min_scale},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def check(tc, *, cuda: bool) -> None:
    """What this engine cannot run, refused before any process group (ValueError naming the keys)."""
    if tc.parallel.ep_size > 1:
        raise ValueError(f"parallel.ep_size={tc.parallel.ep_size} (expert parallelism) runs with engine=native; "
                         "got engine=deepspeed (with parallel.ep_size=1 every engine takes MoE models)")
    if tc.precision.name == "fp16":
        _check_fp16(tc.precision)
        if not uses_cuda(tc, cuda):
            raise ValueError("engine=deepspeed with precision=fp16 needs a GPU (DeepSpeed's CPU accelerator has no "
                             "fp16); use precision=bf16, or engine=native for fp16 with loss scaling on CPU")


def _check_fp16(p: PrecisionConfig) -> None:
    """fp16 settings DeepSpeed cannot express (its scale starts at a power of 2 and moves by a factor
    of 2; its floor is an integer) are refused rather than trained with other settings than asked."""
    power = math.log2(p.init_scale)
    problems = [f"precision.{key}={value:g} ({why})" for bad, key, value, why in (
        (power != round(power), "init_scale", p.init_scale, "DeepSpeed starts at a power of 2"),
        (p.growth_factor != 2.0, "growth_factor", p.growth_factor, "DeepSpeed grows by 2"),
        (p.backoff_factor != 0.5, "backoff_factor", p.backoff_factor, "DeepSpeed backs off by 1/2"),
        (p.min_scale != int(p.min_scale), "min_scale", p.min_scale, "DeepSpeed's floor is an integer"),
    ) if bad]
    if problems:
        raise ValueError("engine=deepspeed with precision=fp16 cannot express " + "; ".join(problems)
                         + "; use DeepSpeed's values or engine=native")


# -- DeepSpeed's optimizer state as tensors and plain types ----------------------------------
ALLOWED = {"deepspeed.runtime.fp16.loss_scaler.LossScaler", "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
           "deepspeed.runtime.zero.config.ZeroStageEnum", "deepspeed.utils.tensor_fragment.fragment_address"}


def _qualname(cls) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _class(name: str):
    if name not in ALLOWED:
        raise ValueError(f"trainer.resume: the DeepSpeed state names {name!r}, which is not an allowed class")
    module, _, attr = name.rpartition(".")
    return getattr(importlib.import_module(module), attr)


def encode(obj):
    """A tree of tensors, plain types, lists and dicts standing for `obj` (DeepSpeed's state_dict)."""
    if torch.is_tensor(obj) or obj is None or isinstance(obj, (bool, int, float, str)) and not isinstance(obj, enum.Enum):
        return obj
    if isinstance(obj, dict):
        return {"__dict__": [[encode(k), encode(v)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return {"__tuple__" if isinstance(obj, tuple) else "__list__": [encode(v) for v in obj]}
    name = _qualname(type(obj))
    _class(name)  # refuses what the allow-list does not know, at save time already
    if isinstance(obj, enum.Enum):
        return {"__enum__": name, "value": obj.value}
    return {"__object__": name, "state": encode(vars(obj))}


def decode(tree):
    if not isinstance(tree, dict):
        return tree
    if "__dict__" in tree:
        return {decode(k): decode(v) for k, v in tree["__dict__"]}
    if "__list__" in tree:
        return [decode(v) for v in tree["__list__"]]
    if "__tuple__" in tree:
        return tuple(decode(v) for v in tree["__tuple__"])
    cls = _class(tree.get("__enum__") or tree["__object__"])
    if "__enum__" in tree:
        return cls(tree["value"])
    obj = cls.__new__(cls)
    obj.__dict__.update(decode(tree["state"]))
    return obj


class DeepSpeedEngine:
    """A deepspeed.DeepSpeedEngine behind ringtrain's Engine interface (engines/__init__.py)."""

    def __init__(self, *, model, comms: Comms, parallel: ParallelConfig, precision: PrecisionConfig,
                 optim: OptimConfig, loop: LoopConfig, device: torch.device):
        import deepspeed

        self._ds = deepspeed
        self.model, self.comms, self.device = model, comms, device
        self.stage, self.parallel_name, self.precision_name = parallel.zero_stage, parallel.name, precision.name
        self.policy = PrecisionPolicy.from_name(precision.name, grad_reduce=precision.grad_reduce)
        self.optim_cfg, self.max_steps, self.grad_accum = optim, loop.max_steps, loop.grad_accum
        self.bucket_elements = _elements(parallel.bucket_mb)
        broadcast_module_state(model, comms)  # rank 0's weights, as the native engine starts from
        optimizer = adamw_factory(optim)(model.param_groups(optim.weight_decay))
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=deepspeed_config(parallel, precision, optim, loop))

    def train_step(self, batches, step: int) -> StepResult:
        lr = lr_at(step, self.optim_cfg, self.max_steps)
        set_lr(self.optimizer, lr)
        self.model.set_step(step)
        loss_sum, norm = torch.zeros((), device=self.device), None
        for _ in range(self.grad_accum):  # DeepSpeed knows the accumulation boundary itself
            x, y = batches.next_batch()
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            with self.policy.autocast(self.device):
                _, loss = self.engine(x, y)
            # the loss is already divided by grad_accum; DeepSpeed's step acts only at the boundary
            self.engine.backward(loss * (1.0 / self.grad_accum), scale_wrt_gas=False)
            if self.stage == 0 and self.engine.is_gradient_accumulation_boundary():
                # stage 0 reports no norm: measure the averaged gradients before step() clears them
                norm = torch.nn.utils.get_total_norm([p.grad for p in self.model.parameters() if p.grad is not None])
            self.engine.step()
            loss_sum += loss.detach()
        if self.stage != 0:
            norm = self.engine.get_global_grad_norm()
        return StepResult(loss_sum / self.grad_accum, torch.tensor(float("nan") if norm is None else float(norm)), lr)

    def eval_loss(self, x, y):
        with self.policy.autocast(self.device):
            _, loss = self.engine(x.to(self.device), y.to(self.device))
        return loss

    def _gathered(self):
        if self.stage == 3:
            return self._ds.zero.GatheredParameters(list(self.model.parameters()), modifier_rank=None)
        return contextlib.nullcontext()

    def state_dict(self) -> EngineState:
        with self._gathered():
            model = None if self.comms.dp.rank != 0 else {
                k: v.detach().float().clone() if v.is_floating_point() else v.detach().clone()
                for k, v in self.model.state_dict().items()}
        e = self.engine
        return EngineState(model=model, local={
            "optimizer": encode(e.optimizer.state_dict()), "world_size": self.comms.dp.world_size,
            "counters": {"global_steps": e.global_steps, "global_samples": e.global_samples,
                         "skipped_steps": e.skipped_steps}})

    def sharded_template(self) -> dict:
        return {}

    def load_state_dict(self, state: EngineState) -> None:
        saved_world = state.local.get("world_size")
        if saved_world != self.comms.dp.world_size:
            raise ConfigError(f"trainer.resume: a DeepSpeed checkpoint resumes at the world size it was saved "
                              f"with ({saved_world}), not {self.comms.dp.world_size}")
        sd, opt = decode(state.local["optimizer"]), self.engine.optimizer
        if "state_dict_list" in inspect.signature(opt.load_state_dict).parameters:
            # DeepSpeed indexes the list by data-parallel rank; at the same world size it reads ours only
            rank, world = self.comms.dp.rank, self.comms.dp.world_size
            opt.load_state_dict([sd if r == rank else None for r in range(world)], load_optimizer_states=True,
                                load_from_fp32_weights=True)
        else:
            opt.load_state_dict(sd)
        for key, value in state.local["counters"].items():
            setattr(self.engine, key, value)

    def model_state_bytes(self) -> dict[str, int]:
        return {}  # DeepSpeed's partitions are internal; compare peak memory instead

    def metrics(self) -> dict:
        if self.precision_name != "fp16":
            return {}
        opt = self.engine.optimizer
        scale = getattr(opt, "cur_scale", None) or getattr(opt, "loss_scale", None)
        return {"loss_scale": None if scale is None else float(scale)}

    def comm_stats(self):
        return None

    def describe(self) -> str:
        note = f", buckets {self.bucket_elements} elements (rounded to a multiple of {ALIGNMENT})"
        if self.precision_name == "fp16":
            note += ("; DeepSpeed grows the loss scale after loss_scale_window + 1 clean steps the first time, "
                     "so fp16 drifts from the native engine at every growth")
        return f"engine deepspeed, {self.parallel_name}, {self.precision_name}{note}"

    def close(self) -> None:
        pass
