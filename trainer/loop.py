"""The training step, evaluation, and the loop that logs and checkpoints them."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from parallel.loss_scale import DynamicLossScaler
from parallel.precision import PrecisionPolicy, unscale_clip_step

from . import checkpoint
from .config import TrainConfig
from .data import ShardedBatches, eval_batches
from .optim import lr_at, set_lr

log = logging.getLogger("ringtrain.train")


@dataclass
class RunState:
    """Everything the loop needs, built by trainer.train."""

    cfg: TrainConfig
    ddp: torch.nn.Module          # parallel.data_parallel.DataParallel
    optimizer: torch.optim.Optimizer
    batches: ShardedBatches
    val_tokens: object
    device: torch.device
    rank: int
    world_size: int
    run_dir: Path
    flops_per_token: float
    peak_flops: float
    metrics_file: object          # rank 0 only, else None
    logger: object                # rank 0 only, else None
    policy: PrecisionPolicy = PrecisionPolicy.from_name("fp32")
    scaler: DynamicLossScaler | None = None  # fp16 with the native engine
    ep_comm: object = None                     # expert parallelism's all-to-all Communicator
    skipped_nonfinite: int = 0                 # fp32/bf16 steps skipped for a non-finite loss (checkpointed)

    @property
    def skipped_steps(self) -> int:
        """Steps not applied (fp16 overflows, or non-finite losses skipped): the schedule ignores them."""
        return self.scaler.state.skipped_steps if self.scaler else self.skipped_nonfinite


class NonFiniteLossError(RuntimeError):
    """trainer.on_nonfinite=stop and a rank's loss (or the gradients) became inf / nan."""


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process so far: allocated on CUDA, resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def train_step(s: RunState, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step: accumulation, scaled backward, averaged gradients, unscaling,
    overflow check, clipping, update. Returns (mean micro-batch loss, global grad norm)."""
    cfg, ddp, model = s.cfg, s.ddp, s.ddp.module
    # a skipped (overflowed / non-finite) step does not advance the schedule
    set_lr(s.optimizer, lr_at(step - s.skipped_steps, cfg.optim, cfg.trainer.max_steps))
    model.set_step(step)  # Performer redraws its features here, identically on every rank
    accum = cfg.trainer.grad_accum
    scale = s.scaler.scale if s.scaler else 1.0  # fp16: keeps small gradients representable
    loss_sum = torch.zeros((), device=s.device)
    for micro in range(accum):
        x, y = s.batches.next_batch()                     # (B, T) int64 each
        x, y = x.to(s.device, non_blocking=True), y.to(s.device, non_blocking=True)
        last = micro == accum - 1
        # gradients of all but the last micro-step stay local; the last one's backward
        # launches each bucket's all-reduce as soon as the bucket is complete
        with (contextlib.nullcontext() if last else ddp.no_sync()):
            with s.policy.autocast(s.device):
                _, loss = ddp(x, y)                       # mean cross-entropy over B*T, float32
            ddp.backward(loss * (scale / accum))
        loss_sum += loss.detach()
    ddp.finish_gradient_sync()                            # averaged over data-parallel ranks
    clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else math.inf
    if cfg.engine == "native":
        # unscale, global norm (across shards under ZeRO), skip everywhere if any rank
        # overflowed, clip, step on the float32 masters, refresh/all-gather the parameters
        out = unscale_clip_step(ddp, s.scaler, max_norm=clip, loss=loss_sum,
                                report_overflow=cfg.precision.report_overflow)
        grad_norm = out.norm
        if out.nonfinite and s.scaler is None:  # fp32 / bf16: no scale to lower
            message = (f"non-finite loss at step {step + 1} on rank(s) {out.nonfinite_ranks}" if out.nonfinite_ranks
                       else f"non-finite gradients at step {step + 1} (the loss was finite on every rank; "
                            "averaging spreads one rank's inf to all)")
            if cfg.trainer.on_nonfinite == "stop":
                raise NonFiniteLossError(f"{message}; trainer.on_nonfinite=stop")
            s.skipped_nonfinite += 1
            if s.rank == 0:
                log.warning(f"{message}: step skipped (trainer.on_nonfinite=skip, {s.skipped_nonfinite} so far)")
    else:  # the engine scales, clips and steps itself
        grad_norm = ddp.clip_grad_norm_(clip)
        ddp.optimizer_step()
    ddp.zero_grad()
    return loss_sum / accum, grad_norm


@torch.no_grad()
def evaluate(s: RunState) -> float:
    """Mean validation loss over trainer.eval_batches micro-batches per rank, all ranks."""
    model = s.ddp.module
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=s.device)  # (loss sum, batches)
    for x, y in eval_batches(s.val_tokens, seq_len=s.cfg.model.seq_len,
                             micro_batch_size=s.cfg.trainer.micro_batch_size, dp_rank=s.rank,
                             dp_size=s.world_size, max_batches=s.cfg.trainer.eval_batches):
        with s.policy.autocast(s.device):
            _, loss = s.ddp(x.to(s.device), y.to(s.device))  # through the wrapper: FSDP must unshard
        total[0] += loss.double()
        total[1] += 1
    s.ddp.comm.all_reduce(total, op="sum")
    model.train()
    return (total[0] / total[1].clamp_min(1)).item()


def _scaler_metrics(s: RunState) -> dict:
    """fp16: the loss scale and the overflow counters (DeepSpeed's own scale for engine=deepspeed);
    fp32 / bf16: the steps skipped for a non-finite loss."""
    if s.scaler is None and s.cfg.engine == "native":
        return {"skipped_steps": s.skipped_nonfinite}
    if s.scaler is not None:
        st = s.scaler.state
        return {"loss_scale": st.scale, "skipped_steps": st.skipped_steps,
                "consecutive_overflows": st.consecutive_overflows}
    engine_scale = getattr(s.ddp, "loss_scale", None)
    return {"loss_scale": engine_scale()} if callable(engine_scale) and s.cfg.precision.name == "fp16" else {}


def _a2a_counters(s: RunState) -> tuple[float, float]:
    st = s.ep_comm.stats if s.ep_comm is not None else None
    return (st.bytes_sent, st.wait_s) if st is not None else (0.0, 0.0)


def _moe_metrics(s: RunState, window_steps: int, a2a0: tuple[float, float]) -> dict:
    """MoE routing of the last micro-batch (mean over ranks) and the all-to-all traffic per step."""
    stats = s.ddp.module.moe_stats()
    if not stats:
        return {}
    keys = sorted(stats)
    values = torch.stack([stats[k].float().to(s.device) for k in keys])
    s.ddp.comm.all_reduce(values, op="avg")
    out = {f"moe_{k}": v for k, v in zip(keys, values.tolist())}
    a2a = _a2a_counters(s)
    out["a2a_bytes_per_step"] = (a2a[0] - a2a0[0]) / window_steps
    out["a2a_wait_s_per_step"] = (a2a[1] - a2a0[1]) / window_steps
    return out


def run(s: RunState, start_step: int) -> dict:
    """Steps from start_step to trainer.max_steps; returns the last logged record."""
    t = s.cfg.trainer
    stats = s.ddp.comm.stats
    tokens_per_step = t.micro_batch_size * s.cfg.model.seq_len * t.grad_accum * s.world_size
    ckpt_root = s.run_dir / "checkpoints"
    native = s.cfg.engine == "native"
    end = t.max_steps if t.stop_after_steps is None else min(t.max_steps, t.stop_after_steps)
    bar = tqdm(total=t.max_steps, initial=start_step, disable=not (t.progress and s.rank == 0),
               dynamic_ncols=True, desc="train")
    last_record: dict = {}
    window_loss = torch.zeros((), device=s.device)
    window_steps, window_t0 = 0, time.perf_counter()
    bytes0, wait0 = stats.bytes_sent, stats.wait_s
    a2a0 = _a2a_counters(s)
    with logging_redirect_tqdm():
        for step in range(start_step, end):
            loss, grad_norm = train_step(s, step)
            window_loss += loss
            window_steps += 1
            done = step + 1
            is_eval = bool(t.eval_every and done % t.eval_every == 0) or done == t.max_steps
            if done % t.log_every == 0 or is_eval:
                if s.device.type == "cuda":
                    torch.cuda.synchronize(s.device)
                elapsed = time.perf_counter() - window_t0
                step_bytes = (stats.bytes_sent - bytes0) / window_steps
                step_wait = (stats.wait_s - wait0) / window_steps
                mean_loss = (window_loss / window_steps).reshape(1).clone()
                s.ddp.comm.all_reduce(mean_loss, op="avg")  # the loss every rank saw
                step_time = elapsed / window_steps
                record = {
                    "step": done, "loss": mean_loss.item(),
                    "lr": s.optimizer.param_groups[0]["lr"], "grad_norm": float(grad_norm),
                    "tokens_per_s": tokens_per_step / step_time, "step_time_s": step_time,
                    "mfu": s.flops_per_token * tokens_per_step / step_time / (s.peak_flops * s.world_size),
                    # DeepSpeed's own gradient traffic is invisible to ringtrain's counters
                    "comm_bytes_per_step": step_bytes if native else None,
                    "comm_wait_s_per_step": step_wait if native else None,
                    **{f"mem_{k}_bytes": v for k, v in s.ddp.model_state_bytes().items()},
                    "peak_mem_mb": peak_memory_mb(s.device),
                    **_scaler_metrics(s),
                    **_moe_metrics(s, window_steps, a2a0),
                }
                if is_eval:
                    record["val_loss"] = evaluate(s)
                    record["val_ppl"] = math.exp(min(record["val_loss"], 50.0))
                if s.rank == 0:
                    s.metrics_file.write(record)
                    s.logger.log(record)
                    bar.set_postfix(loss=f"{record['loss']:.3f}")
                last_record = record
                window_loss.zero_()
                window_steps, window_t0 = 0, time.perf_counter()
                bytes0, wait0 = stats.bytes_sent, stats.wait_s
                a2a0 = _a2a_counters(s)
            if (t.ckpt_every and done % t.ckpt_every == 0) or done == end:
                t_save = time.perf_counter()
                # float32 (master) weights, gathered from the shards under ZeRO; rank 0's copy
                model_state = s.ddp.consolidated_state_dict()
                rank_state = {"sampler": s.batches.state_dict(), "skipped_nonfinite": s.skipped_nonfinite,
                              "loss_scaler": s.scaler.state_dict() if s.scaler else None}
                checkpoint.save(ckpt_root, done, model_state=model_state, save_optimizer=s.ddp.save_optimizer,
                                rank_state=rank_state, rank=s.rank,
                                world_size=s.world_size, group=s.ddp.comm.group,
                                keep=t.keep_last, extra_meta={"parallel": s.cfg.parallel.name, "ep_size": s.cfg.parallel.ep_size})
                window_t0 += time.perf_counter() - t_save  # saving is not training time
            bar.update(1)
    bar.close()
    return last_record
