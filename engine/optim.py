"""The optimizer and the learning rate's shape over a run (train.schedule, warm-up, minimum lr)."""
from __future__ import annotations

import math

import torch

from engine.config import TrainConfig


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases and LayerNorm weights (every parameter under 2 dims)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    try:  # one fused kernel per step instead of a dozen per tensor
        return torch.optim.AdamW(groups, lr=cfg.lr, fused=True)
    except (RuntimeError, TypeError):  # fused is not offered for every device and tensor type
        return torch.optim.AdamW(groups, lr=cfg.lr)


def lr_schedule(optimizer, shape: str, warmup_steps: int, total_steps: int, min_ratio: float = 0.0):
    """Linear warm-up from 0 to lr, then `shape` down to min_ratio * lr at the last step.

    linear and cosine decay to min_ratio * lr; constant holds lr (min_ratio unused).
    """
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if shape == "constant":
            return 1.0
        left = max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))  # 1 -> 0 after warm-up
        decayed = left if shape == "linear" else 0.5 * (1.0 + math.cos(math.pi * (1.0 - left)))
        return min_ratio + (1.0 - min_ratio) * decayed
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def build_schedule(optimizer, cfg: TrainConfig, total_steps: int):
    """The recipe's schedule over a run of `total_steps` optimizer steps."""
    warmup = int(cfg.warmup_ratio * total_steps)
    return lr_schedule(optimizer, cfg.schedule, warmup, total_steps, cfg.min_lr_ratio)


def follow_schedule(scheduler) -> list[float]:
    """Set each group's lr to the schedule's value at its current step, and return them: after a
    resume that rebuilt the schedule over another length, the lr the checkpoint brought back is the
    old schedule's (the expression is LambdaLR's own, so an unchanged schedule gives the same lr)."""
    lrs = [base * fn(scheduler.last_epoch) for fn, base in zip(scheduler.lr_lambdas, scheduler.base_lrs, strict=True)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr
    return lrs
