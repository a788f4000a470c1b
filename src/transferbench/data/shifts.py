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


# Label-preserving shifts: they move the input away from natural-image statistics while the task stays about as
# learnable from scratch (the information is rearranged or re-coded, not destroyed), so a falling gain measures
# what pretraining loses, not a harder task. Neyshabur, Sedghi & Zhang 2020 used block shuffling as such a dial.

@SHIFTS.register(label_preserving=True)
def block_shuffle(x: torch.Tensor, severity: int, g: torch.Generator) -> torch.Tensor:
    """The image cut into 2x2 to 32x32 blocks per side, the blocks permuted by one permutation shared by every image
    of every split (Neyshabur et al. 2020): local statistics stay, the global layout goes."""
    side = x.shape[-1]
    n = min([2, 4, 8, 16, 32][severity - 1], side)
    b = side // n
    # one permutation for the condition, whatever the split: `g` is seeded per split, so it is not used here
    perm = torch.randperm(n * n, generator=torch.Generator().manual_seed(1000 + n))
    head = x[..., :n * b, :n * b]
    blocks = head.unfold(-2, b, b).unfold(-2, b, b)  # [N, C, n, n, b, b]
    blocks = blocks.reshape(*x.shape[:2], n * n, b, b)[:, :, perm].reshape(*x.shape[:2], n, n, b, b)
    out = x.clone()
    out[..., :n * b, :n * b] = blocks.permute(0, 1, 2, 4, 3, 5).reshape(*x.shape[:2], n * b, n * b)
    return out


@SHIFTS.register(label_preserving=True)
def solarize(x: torch.Tensor, severity: int, g: torch.Generator) -> torch.Tensor:
    """Every value above a threshold inverted (0.8 down to 0: at 5 the whole image is the colour negative)."""
    return F.solarize(x, [0.8, 0.6, 0.4, 0.2, 0.0][severity - 1])


@SHIFTS.register(label_preserving=True)
def high_pass(x: torch.Tensor, severity: int, g: torch.Generator) -> torch.Tensor:
    """Low spatial frequencies removed: the image minus its Gaussian blur (sigma 12% down to 2% of the side),
    rescaled per image to [0, 1]; edges and fine texture stay, shading and colour regions go."""
    sigma = [0.12, 0.08, 0.05, 0.03, 0.02][severity - 1] * x.shape[-1]
    k = 2 * int(3 * sigma) + 1
    detail = x - F.gaussian_blur(x, kernel_size=[k, k], sigma=[sigma, sigma])
    lo = detail.amin(dim=(1, 2, 3), keepdim=True)
    hi = detail.amax(dim=(1, 2, 3), keepdim=True)
    return (detail - lo) / (hi - lo).clamp_min(1e-6)
