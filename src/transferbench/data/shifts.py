"""Distribution shifts with a severity 1-5, on torchvision.transforms.v2 tensors in [0, 1].

Each is applied once to the whole split with a fixed generator (an ImageNet-C-style fixed
corrupted copy), so every cell of a condition sees the same images.
"""

import torch
import torchvision.transforms.v2.functional as F

from transferbench.core.registry import Registry

SHIFTS = Registry("shift")


@SHIFTS.register()
def gaussian_noise(x: torch.Tensor, severity: int, g: torch.Generator) -> torch.Tensor:
    """Additive Gaussian noise at ImageNet-C's five levels (sigma 0.08 to 0.38)."""
    sigma = [0.08, 0.12, 0.18, 0.26, 0.38][severity - 1]  # ImageNet-C's levels
    return (x + sigma * torch.randn(x.shape, generator=g)).clamp(0, 1)


@SHIFTS.register()
def gaussian_blur(x: torch.Tensor, severity: int, g: torch.Generator) -> torch.Tensor:
    """Gaussian blur, sigma 1.5% to 7% of the image side."""
    sigma = [0.015, 0.025, 0.035, 0.05, 0.07][severity - 1] * x.shape[-1]  # relative to image size
    k = 2 * int(3 * sigma) + 1
    return F.gaussian_blur(x, kernel_size=[k, k], sigma=[sigma, sigma])


@SHIFTS.register()
def contrast(x: torch.Tensor, severity: int, g: torch.Generator) -> torch.Tensor:
    """Contrast reduced by ImageNet-C's factors (0.4 to 0.05)."""
    return F.adjust_contrast(x, [0.4, 0.3, 0.2, 0.1, 0.05][severity - 1])  # ImageNet-C's factors


@SHIFTS.register()
def grayscale(x: torch.Tensor, severity: int, g: torch.Generator) -> torch.Tensor:
    """A blend towards gray, severity / 5 of the way (5: fully gray)."""
    alpha = severity / 5  # blend towards gray; 5 = fully gray
    return torch.lerp(x, F.rgb_to_grayscale(x, num_output_channels=3), alpha)


@SHIFTS.register()
def low_resolution(x: torch.Tensor, severity: int, g: torch.Generator) -> torch.Tensor:
    """Down-sampled by 1.5x to 6x and back up (antialiased)."""
    size = x.shape[-1]
    small = max(2, round(size / [1.5, 2, 3, 4, 6][severity - 1]))
    down = F.resize(x, [small, small], antialias=True)
    return F.resize(down, [size, size], antialias=True).clamp(0, 1)


def apply_shift(x: torch.Tensor, name: str, severity: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return SHIFTS.get(name, "targets.shift")(x, severity, g)
