"""AdamW over the model's two parameter groups, and the warm-up + cosine schedule."""

from __future__ import annotations

import math

import torch

from .config import OptimConfig


def adamw_factory(cfg: OptimConfig):
    """groups -> AdamW; the parallel wrapper decides which tensors the groups hold (full
    parameters under DDP, this rank's shards under ZeRO)."""
    return lambda groups: torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)


def lr_at(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Linear warm-up to cfg.lr over warmup_steps, then cosine down to lr * min_lr_ratio
    at max_steps (and flat after it)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.lr - floor) * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr
