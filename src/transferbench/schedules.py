"""LR schedules (stepped once per optimizer step) and optimizers, on torch's own schedulers."""

from __future__ import annotations

import torch
from torch.optim import lr_scheduler as S

from .registry import Registry

SCHEDULES = Registry("schedule")


@SCHEDULES.register()
def constant(opt: torch.optim.Optimizer, total_steps: int) -> S.LRScheduler:
    return S.LambdaLR(opt, lambda step: 1.0)


@SCHEDULES.register()
def step(opt: torch.optim.Optimizer, total_steps: int) -> S.LRScheduler:
    """x0.1 at 50% and again at 75% of training."""
    return S.MultiStepLR(opt, milestones=[total_steps // 2, (3 * total_steps) // 4], gamma=0.1)


@SCHEDULES.register()
def cosine(opt: torch.optim.Optimizer, total_steps: int) -> S.LRScheduler:
    return S.CosineAnnealingLR(opt, T_max=max(1, total_steps))


@SCHEDULES.register()
def warmup_cosine(opt: torch.optim.Optimizer, total_steps: int) -> S.LRScheduler:
    """Linear warm-up over the first 10% of steps, then cosine to zero."""
    warm = max(1, total_steps // 10)
    return S.SequentialLR(opt, [S.LinearLR(opt, start_factor=0.1, total_iters=warm),
                                S.CosineAnnealingLR(opt, T_max=max(1, total_steps - warm))], milestones=[warm])


OPTIMIZERS = Registry("optimizer")  # name -> (trainable params, lr, weight_decay) -> torch.optim.Optimizer


@OPTIMIZERS.register()
def sgd(params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay, nesterov=True, fused=True)


@OPTIMIZERS.register()
def adamw(params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)


def make_optimizer(params, name: str, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """Fused kernels (CPU and CUDA): one pass over all parameters instead of one per tensor."""
    return OPTIMIZERS.get(name, "train.optimizer")([p for p in params if p.requires_grad], lr, weight_decay)
