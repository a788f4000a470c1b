"""One training loop for every arm: scratch is "no pretrained weights, nothing frozen".

A cell = frozen prefix (its output cached) + trainable suffix trained on a k-shot subset, with
validation after every epoch (curves) and the test split once at the end.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from .backbones import create_backbone, frozen_fraction, resolve_depth, split_at_depth
from .data import load_target, nested_kshot
from .features import FeatureCache, feature_key
from .schedules import SCHEDULES, make_optimizer
from .study import Cell


class Diverged(RuntimeError):
    """The loss went NaN or infinite: the cell fails, the study goes on."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but no CUDA device is visible")
    return torch.device(name)


def _autocast(device: torch.device, amp: bool):
    return torch.autocast("cuda", dtype=torch.bfloat16) if amp and device.type == "cuda" else nullcontext()


def _layout(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.dim() == 4 else x


@torch.inference_mode()
def forward_batched(module: nn.Module, x: torch.Tensor, device: torch.device, amp: bool = False,
                    channels_last: bool = False, batch_size: int = 256) -> torch.Tensor:
    """module(x) in eval mode, batch by batch, returned as float32 on the CPU."""
    module.eval()
    outs = []
    for i in range(0, len(x), batch_size):
        xb = _layout(x[i:i + batch_size].to(device, non_blocking=True), channels_last)
        with _autocast(device, amp):
            outs.append(module(xb).float().cpu())
    return torch.cat(outs)


def augment_batch(x: torch.Tensor, g: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Per-sample horizontal flip and one random translation per batch, on tensors (airbench-style)."""
    flip = torch.rand(len(x), generator=g) < 0.5
    x = torch.where(flip.view(-1, 1, 1, 1).to(x.device), x.flip(-1), x)
    dx, dy = torch.randint(-pad, pad + 1, (2,), generator=g).tolist()
    return torch.roll(x, shifts=(dy, dx), dims=(-2, -1))


def evaluate(module: nn.Module, x: torch.Tensor, y: torch.Tensor, device, amp, channels_last) -> tuple[float, float]:
    logits = forward_batched(module, x, device, amp, channels_last)
    return (logits.argmax(1) == y).float().mean().item(), F.cross_entropy(logits, y).item()


def train_cell(cell: Cell, cache: FeatureCache | None = None) -> dict:
    """Train and evaluate one cell; returns the measured part of its record."""
    cache = cache or FeatureCache()
    device = resolve_device(cell.device)
    t_start = time.perf_counter()
    target = load_target(cell.dataset, cell.shift, cell.severity, cell.image_size)
    bb = create_backbone(cell.model, cell.weights, target.num_classes, cell.seed)
    k = resolve_depth(cell.frozen_depth, bb.n_groups)
    # Augmentation must pass through the frozen layers, so such cells pay full price (no cache).
    prefix, suffix, cacheable = split_at_depth(bb, k, allow=not cell.augment)
    prefix_depth = k if cacheable else 0
    key = feature_key(model=cell.model, weights=bb.weights_id, depth=prefix_depth, target=target.name,
                      image_size=cell.image_size, mean=bb.data_config["mean"], std=bb.data_config["std"])
    t0 = time.perf_counter()
    feats, cache_state = cache.get(
        key, lambda: {s: forward_batched(prefix.to(device), x, device, cell.amp, cell.channels_last)
                      for s, x in target.x.items()},
        disk=prefix_depth > 0)  # depth 0 features are just normalised images: cheaper to redo than to read
    prefix_seconds = time.perf_counter() - t0 if cache_state == "miss" else 0.0

    idx = torch.from_numpy(nested_kshot(target.y["train"].numpy(), cell.n_per_class, cell.seed))
    x_train, y_train = feats["train"][idx].to(device), target.y["train"][idx].to(device)
    suffix = suffix.to(device)
    if cell.channels_last:
        suffix = suffix.to(memory_format=torch.channels_last)
    n, bs = len(idx), min(cell.batch_size, len(idx))
    steps_per_epoch = math.ceil(n / bs)
    opt = make_optimizer(suffix.parameters(), cell.optimizer, cell.lr, cell.weight_decay)
    sched = SCHEDULES.get(cell.schedule, "grid.schedule")(opt, cell.epochs * steps_per_epoch)
    g = torch.Generator().manual_seed(cell.seed)
    curves, seen = [], 0
    t0 = time.perf_counter()
    for epoch in range(1, cell.epochs + 1):
        suffix.train()
        perm, total = torch.randperm(n, generator=g).to(device), 0.0
        for i in range(0, n, bs):
            xb, yb = x_train[perm[i:i + bs]], y_train[perm[i:i + bs]]
            if cell.augment:
                xb = augment_batch(xb, g)
            with _autocast(device, cell.amp):
                loss = F.cross_entropy(suffix(_layout(xb, cell.channels_last)), yb)
            if not torch.isfinite(loss):
                raise Diverged(f"loss became {loss.item()} at epoch {epoch}; lower the LR (grid.schedule lr)")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(yb)
            seen += len(yb)
        val_acc, val_loss = evaluate(suffix, feats["val"], target.y["val"], device, cell.amp, cell.channels_last)
        curves += [dict(epoch=epoch, split="train", metric="loss", value=total / n, images_seen=seen),
                   dict(epoch=epoch, split="val", metric="acc", value=val_acc, images_seen=seen),
                   dict(epoch=epoch, split="val", metric="loss", value=val_loss, images_seen=seen)]
    train_seconds = time.perf_counter() - t0
    test_acc, test_loss = evaluate(suffix, feats["test"], target.y["test"], device, cell.amp, cell.channels_last)
    return dict(
        frozen_groups=k, n_groups=bb.n_groups, frozen_fraction=round(frozen_fraction(bb, k), 6),
        n_train=n, num_classes=target.num_classes, target=target.name, weights_id=bb.weights_id,
        val_acc=val_acc, val_loss=val_loss, test_acc=test_acc, test_loss=test_loss,
        train_seconds=train_seconds, prefix_seconds=prefix_seconds,
        cell_seconds=time.perf_counter() - t_start, images_per_second=seen / max(train_seconds, 1e-9),
        images_seen=seen, cache=cache_state if cacheable else "off", device=str(device), curves=curves)
