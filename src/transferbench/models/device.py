"""Where and how tensors run: the device, bf16 autocast, memory layout, and batched inference (evaluation and the
frozen prefix's features, which the domain measures use too)."""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn

from transferbench.models.features import FeatureCache, prefix_key


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but no CUDA device is visible")
    return torch.device(name)


def autocast(device: torch.device, amp: bool):
    """bf16 autocast on a GPU when train.amp; nothing on the CPU (it trains in the weights' precision)."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if amp and device.type == "cuda" else nullcontext()


def widened(t: torch.Tensor) -> torch.Tensor:
    """Outputs in at least float32: bf16 from autocast widened, float64 kept (a float64 network is scored in float64,
    or its losses would carry float32 rounding that differs between CPU kernels)."""
    return t if t.dtype == torch.float64 else t.float()


def as_layout(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """A 4-D tensor in channels_last memory format when asked (the weights must match, or conv takes a slow path)."""
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.dim() == 4 else x


def eval_batch_size(device: torch.device) -> int:
    """Examples per forward pass in evaluation (64: fastest measured on 1 CPU thread)."""
    return 512 if device.type == "cuda" else 64


@torch.inference_mode()
def forward_batched(module: nn.Module, x: torch.Tensor, device: torch.device, amp: bool = False,
                    channels_last: bool = False, batch_size: int | None = None) -> torch.Tensor:
    """module(x) in eval mode, batch by batch, returned on the CPU in at least float32 (`widened`)."""
    module.eval()
    batch_size = batch_size or eval_batch_size(device)
    if channels_last:  # weights in the same layout as the input, or conv falls back to a slow path
        module = module.to(memory_format=torch.channels_last)
    outs = []
    for i in range(0, len(x), batch_size):
        xb = as_layout(x[i:i + batch_size].to(device, non_blocking=True), channels_last)
        with autocast(device, amp):
            outs.append(widened(module(xb)).cpu())
    return torch.cat(outs)


def prefix_features(cache: FeatureCache, model_name: str, bb, prefix: nn.Module, depth: int, target, image_size: int,
                    device, amp: bool, channels_last: bool) -> tuple[dict[str, torch.Tensor], str]:
    """The frozen prefix's output on every split of a target, through the cache: (features, memory|disk|miss)."""
    return cache.get(
        prefix_key(model_name, bb, depth, target.key, image_size),
        lambda: {s: forward_batched(prefix.to(device), x, device, amp, channels_last) for s, x in target.x.items()},
        disk=depth > 0)  # depth-0 "features" are normalised images: cheaper to redo than to read
