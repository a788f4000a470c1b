"""The small-map convolution fast paths are exact: same outputs and gradients as the originals."""

import copy
import itertools

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import Conv2dSame
from torch import nn

from transferbench.models.fastconv import FastConv2d, use_fast_convs, use_plain_convs


def _max_diff(plain: nn.Module, fast: nn.Module, x: torch.Tensor) -> float:
    """Largest difference of the output and of any gradient, relative to the largest value of each.

    Relative to the global scale, not per tensor: a depthwise conv on a 1x1 map followed by
    train-mode BatchNorm has an exactly-zero true gradient, which both paths compute as rounding noise."""
    a, b = plain(x), fast(x)
    assert a.shape == b.shape
    g = torch.randn_like(a)
    ga = torch.autograd.grad(a, [x, *plain.parameters()], g)
    gb = torch.autograd.grad(b, [x, *fast.parameters()], g)
    grad_scale = max(u.abs().max().item() for u in ga)
    return max([(a - b).abs().max().item() / a.abs().max().item()]
               + [(u - v).abs().max().item() / grad_scale for u, v in zip(ga, gb)])


@pytest.mark.parametrize("same", [False, True], ids=["static-pad", "tf-same"])
@pytest.mark.parametrize("groups", ["dense", "depthwise"])
def test_every_small_shape_matches_the_plain_convolution(same, groups):
    """Maps from 1 pixel up to past the kernel, odd kernels 1..7, strides 1 and 2, both layouts."""
    torch.manual_seed(0)
    c, cases = 6, 0
    shapes = itertools.product(range(1, 10), (1, 3, 5, 7), (1, 2), (False, True), (False, True))
    for n, k, s, bias, channels_last in shapes:
        kw = dict(groups=c if groups == "depthwise" else 1, bias=bias, dtype=torch.float64)
        plain = Conv2dSame(c, c, k, s, **kw) if same else nn.Conv2d(c, c, k, s, padding=k // 2, **kw)
        fast = copy.deepcopy(plain)
        assert use_fast_convs(fast) == 1 and type(fast) is FastConv2d
        x = torch.randn(3, c, n, n + 1, dtype=torch.float64)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        assert _max_diff(plain, fast, x.requires_grad_()) < 1e-12, (n, k, s, bias, channels_last)
        cases += 1
    assert cases == 9 * 4 * 2 * 2 * 2


def test_whole_backbone_matches_and_keeps_its_state_dict():
    torch.manual_seed(0)
    plain = timm.create_model("tf_efficientnet_lite0", num_classes=10).double()
    fast = copy.deepcopy(plain)
    assert use_fast_convs(fast) == 49  # 44 plain convs + 5 TF-"same" strided ones
    assert list(fast.state_dict()) == list(plain.state_dict())
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64, requires_grad=True)  # last stages see 2x2 and 1x1 maps
    assert _max_diff(plain.train(), fast.train(), x) < 1e-10
    assert use_plain_convs(fast) == 49 and not any(isinstance(m, FastConv2d) for m in fast.modules())
    fast.load_state_dict(plain.state_dict())  # the train-mode passes updated BN statistics (up to rounding)
    assert torch.equal(plain.eval()(x), fast.eval()(x))  # undone: the very same computation


def test_fast_path_really_takes_the_shortcut(monkeypatch):
    """On a 1x1 map a 5x5 depthwise conv must not reach F.conv2d at all (that is the point)."""
    conv = nn.Conv2d(8, 8, 5, padding=2, groups=8)
    use_fast_convs(conv)
    calls = []
    monkeypatch.setattr(F, "conv2d", lambda *a, **k: calls.append(a) or torch.zeros(1))
    conv(torch.randn(2, 8, 1, 1))
    assert calls == []
    conv(torch.randn(2, 8, 9, 9))
    assert len(calls) == 1
