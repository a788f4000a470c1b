"""LR schedules (stepped once per optimizer step), fine-tuning recipes and optimizers, on torch's own schedulers.

A recipe is a schedule registered with `arm=` (its name in tables) and what it changes in the one training loop:
`probe_first` (LP-FT, Kumar et al. 2022: the head is first fitted to convergence on frozen features, then
everything fine-tunes from it) or `layer_decay` (layer-wise LR decay, as in ULMFiT and BEiT fine-tuning: group g of
n trains at lr * decay ** (n - g), the head at lr). Studies list recipes under `grid.recipes`, each an arm of its
own beside full fine-tuning.
"""

from __future__ import annotations

import torch
from torch.optim import lr_scheduler as S

from transferbench.core.registry import Registry

SCHEDULES = Registry("schedule")


@SCHEDULES.register()
def constant(opt: torch.optim.Optimizer, total_steps: int) -> S.LRScheduler:
    """The base LR throughout."""
    return S.LambdaLR(opt, lambda step: 1.0)


@SCHEDULES.register()
def step(opt: torch.optim.Optimizer, total_steps: int) -> S.LRScheduler:
    """x0.1 at 50% and again at 75% of training."""
    return S.MultiStepLR(opt, milestones=[total_steps // 2, (3 * total_steps) // 4], gamma=0.1)


@SCHEDULES.register()
def cosine(opt: torch.optim.Optimizer, total_steps: int) -> S.LRScheduler:
    """Cosine from the base LR to zero over the budget."""
    return S.CosineAnnealingLR(opt, T_max=max(1, total_steps))


@SCHEDULES.register()
def warmup_cosine(opt: torch.optim.Optimizer, total_steps: int) -> S.LRScheduler:
    """Linear warm-up over the first 10% of steps, then cosine to zero."""
    warm = max(1, total_steps // 10)
    return S.SequentialLR(opt, [S.LinearLR(opt, start_factor=0.1, total_iters=warm),
                                S.CosineAnnealingLR(opt, T_max=max(1, total_steps - warm))], milestones=[warm])


@SCHEDULES.register("lp_ft", arm="LP-FT", probe_first=True)
def lp_ft(opt: torch.optim.Optimizer, total_steps: int) -> S.LRScheduler:
    """LP-FT: the head fitted by the linear probe (L-BFGS, to convergence) first, then cosine fine-tuning."""
    return cosine(opt, total_steps)


@SCHEDULES.register("cosine_llrd", arm="LLRD 0.75", layer_decay=0.75)
def cosine_llrd(opt: torch.optim.Optimizer, total_steps: int) -> S.LRScheduler:
    """Cosine with layer-wise LR decay 0.75: the stem of an 8-group backbone trains at 0.1x the head's LR."""
    return cosine(opt, total_steps)


def recipe(schedule: str) -> dict:
    """What a schedule changes beyond the LR curve ({} for a plain schedule)."""
    return SCHEDULES.meta(schedule) if schedule in SCHEDULES else {}


def layer_lrs(depth_of: dict[str, int], lr: float, decay: float) -> dict[str, float]:
    """Each trainable parameter's LR from its depth group: lr * decay ** (head - group), where the head is the
    deepest group (depth_of maps the head's parameters to n_groups)."""
    head = max(depth_of.values())
    return {name: lr * decay ** (head - g) for name, g in depth_of.items()}


OPTIMIZERS = Registry("optimizer")  # name -> (trainable params, lr, weight_decay) -> torch.optim.Optimizer


@OPTIMIZERS.register()
def sgd(params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """SGD with Nesterov momentum 0.9."""
    return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay, nesterov=True, fused=True)


@OPTIMIZERS.register()
def adamw(params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW (decoupled weight decay)."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)


def make_optimizer(named_params, name: str, lr: float, weight_decay: float,
                   lrs: dict[str, float] | None = None) -> torch.optim.Optimizer:
    """Fused kernels (CPU and CUDA): one pass over all parameters instead of one per tensor. `lrs`: a per-parameter
    LR (layer-wise decay), as one param group per distinct LR; the schedule scales every group alike."""
    trainable = [(n, p) for n, p in named_params if p.requires_grad]
    groups: dict[float, list] = {}
    for n, p in trainable:
        groups.setdefault(lrs[n] if lrs else lr, []).append(p)
    params = [dict(params=ps, lr=group_lr) for group_lr, ps in groups.items()] if len(groups) > 1 else \
        [p for _, p in trainable]
    return OPTIMIZERS.get(name, "train.optimizer")(params, lr, weight_decay)
