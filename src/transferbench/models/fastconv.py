"""Exact fast paths for convolutions on feature maps no larger than their kernel.

At the image sizes a CPU study uses (32 px), EfficientNet's last stages run 3x3 and 5x5
depthwise convolutions on 2x2 and 1x1 maps. Most of their taps then only ever multiply the zero
padding, yet oneDNN's backward pass pays for every tap (a 5x5 depthwise backward on a 1x1 map
costs ~9 ms per batch of 32 on this CPU). `use_fast_convs` swaps each `nn.Conv2d` (and timm's
TF-"same" `Conv2dSame`) for a subclass that, per input size:

- crops the kernel to the taps that can see the input (the dropped taps contribute exact zeros,
  and their gradient is exactly zero either way), with the padding adjusted to match;
- runs a 1x1 kernel on a map of at most `SMALL_MAP` pixels as a matrix product (dense) or an
  elementwise product (depthwise), which the BLAS does several times faster than oneDNN.

Outputs and gradients equal the original module's up to float rounding (tested in float64);
the parameters and the state_dict are untouched. Measured side by side in `bench/`.
"""

from __future__ import annotations

from typing import Any, cast

import torch
import torch.nn.functional as F
from timm.layers import Conv2dSame
from torch import nn

SMALL_MAP = 4  # pixels (h * w) up to which a 1x1 convolution runs as a matmul


def _same_pad(n: int, k: int, s: int) -> tuple[int, int]:
    """TF "SAME" padding (before, after) of one dimension, as timm's pad_same computes it."""
    total = max((-(-n // s) - 1) * s + k - n, 0)
    return total // 2, total - total // 2


def _crop_1d(n: int, k: int, s: int, before: int, after: int) -> tuple[int, int, int, int, int]:
    """For input length n: (first tap, last tap + 1, pad before, pad after, input length to keep)
    of the taps that see at least one input element; the output length is unchanged."""
    m = (n + before + after - k) // s + 1
    used = [i for i in range(k) if any(0 <= o * s + i - before < n for o in range(m))]
    first, stop = used[0], used[-1] + 1
    before -= first
    after = (m - 1) * s + (stop - first) - n - before
    keep = n + min(after, 0)  # trailing inputs no used tap reaches
    return first, stop, before, max(after, 0), keep


class FastConv2d(nn.Conv2d):
    """A Conv2d that runs only the taps that can see its input (see the module docstring)."""

    tf_same: bool = False  # pad like timm's Conv2dSame (asymmetric, from the input size)

    def _plan(self, h: int, w: int):
        plans = self.__dict__.setdefault("_plans", {})
        if (h, w) not in plans:
            pads = [_same_pad(n, k, s) if self.tf_same else (p, p)
                    for n, k, s, p in zip((h, w), self.kernel_size, self.stride, self.padding)]
            plans[(h, w)] = [_crop_1d(n, k, s, *cast(tuple[int, int], pad))  # ints: str paddings go elsewhere
                             for n, k, s, pad in zip((h, w), self.kernel_size, self.stride, pads)]
        return plans[(h, w)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dilation != (1, 1) or self.padding_mode != "zeros" or isinstance(self.padding, str):
            return Conv2dSame.forward(cast(Any, self), x) if self.tf_same else super().forward(x)  # borrowed
        (r0, r1, top, bottom, keep_h), (c0, c1, left, right, keep_w) = self._plan(*x.shape[-2:])
        kh, kw = self.kernel_size
        weight = self.weight if (r0, r1, c0, c1) == (0, kh, 0, kw) else self.weight[:, :, r0:r1, c0:c1]
        if (keep_h, keep_w) != x.shape[-2:]:
            x = x[..., :keep_h, :keep_w]
        if weight.shape[-2:] == (1, 1) and self.stride == (1, 1) and keep_h * keep_w <= SMALL_MAP \
                and top == bottom == left == right == 0:
            return self._pointwise(x, weight)
        if top == bottom and left == right:
            return F.conv2d(x, weight, self.bias, self.stride, (top, left), 1, self.groups)
        return F.conv2d(F.pad(x, (left, right, top, bottom)), weight, self.bias, self.stride, 0, 1, self.groups)

    def _pointwise(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        if self.groups == 1:  # a matmul over channels, in the channels-last view of x
            y = F.linear(x.permute(0, 2, 3, 1).reshape(n * h * w, c), weight.flatten(1), self.bias)
            return y.view(n, h, w, -1).permute(0, 3, 1, 2)
        if self.groups == c == self.out_channels:  # depthwise: one scale per channel
            y = x * weight.view(1, c, 1, 1)
            return y if self.bias is None else y + self.bias.view(1, c, 1, 1)
        return F.conv2d(x, weight, self.bias, 1, 0, 1, self.groups)


def use_fast_convs(model: nn.Module) -> int:
    """Swap every plain Conv2d / Conv2dSame of `model` for FastConv2d, in place; returns how many."""
    swapped = 0
    for module in model.modules():
        if type(module) in (nn.Conv2d, Conv2dSame):
            # torch types nn.Module.__setattr__'s value as Tensor | Module; a plain attribute is fine at run time
            module.tf_same = type(module) is Conv2dSame  # type: ignore[assignment]
            module.__class__ = FastConv2d
            swapped += 1
    return swapped


def use_plain_convs(model: nn.Module) -> int:
    """Undo use_fast_convs (for side-by-side benchmarks and tests); returns how many."""
    swapped = 0
    for module in model.modules():
        if type(module) is FastConv2d:
            # a class swap back to a base class, which mypy only allows towards subclasses
            module.__class__ = Conv2dSame if module.tf_same else nn.Conv2d  # type: ignore[assignment]
            del module.tf_same
            module.__dict__.pop("_plans", None)
            swapped += 1
    return swapped
