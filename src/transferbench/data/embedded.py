"""Targets that ship inside dependencies (no network): built deterministically, cached on disk.

Each builder returns {split: (images uint8 [N, H, W, 3], labels int64 [N])} for the splits
train (the pool k-shot subsets are drawn from), val and test, plus the class names.
"""

from __future__ import annotations

import glob
import os
from typing import Annotated

import numpy as np
from pydantic import Field, NonNegativeInt, PositiveInt

from transferbench.data.raw import DATASETS, SPLITS, RawDataset, split_stratified

# skimage photos and textures: targets never use the source-reference group, so "near" is not "identical".
TEXTURE_IMAGES = ["brick", "grass", "gravel", "coffee", "chelsea", "astronaut", "rocket", "coins", "moon",
                  "immunohistochemistry"]
SOURCE_REFERENCE_IMAGES = ["camera", "clock", "hubble_deep_field", "retina", "cell"]
GLYPH_CLASSES = "ABCDEFGHIJKLMNOPQRST"


def _rgb(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype != np.uint8:
        a = np.clip(np.rint(a * (255.0 / a.max())), 0, 255).astype(np.uint8)
    if a.ndim == 2 or (a.ndim == 3 and a.shape[-1] not in (3, 4)):
        return np.repeat(a[..., None], 3, axis=-1)
    return a[..., :3]


def photo_patches(names: list[str], counts=(60, 20, 30), patch: int = 64, seed: int = 0) -> RawDataset:
    """Patches of skimage photos, one class per photo. Splits come from disjoint vertical bands
    (left 60% train, 20% val, 20% test) so no test patch overlaps a training patch."""
    from skimage import data as skdata

    rng = np.random.default_rng(seed)
    bands = {"train": (0.0, 0.6), "val": (0.6, 0.8), "test": (0.8, 1.0)}
    out: dict[str, tuple[list, list]] = {s: ([], []) for s in SPLITS}
    for label, name in enumerate(names):
        img = _rgb(getattr(skdata, name)())
        h, w = img.shape[:2]
        for split, n in zip(SPLITS, counts):
            lo, hi = int(bands[split][0] * w), int(bands[split][1] * w) - patch
            for _ in range(n):
                r, c = rng.integers(0, h - patch + 1), rng.integers(lo, hi + 1)
                out[split][0].append(img[r:r + patch, c:c + patch])
                out[split][1].append(label)
    return RawDataset({s: (np.stack(xs), np.array(ys, dtype=np.int64)) for s, (xs, ys) in out.items()}, list(names))


@DATASETS.register(family="natural")
def textures() -> RawDataset:
    """Natural photo and texture patches (10 classes): the target nearest the ImageNet source."""
    return photo_patches(TEXTURE_IMAGES)


@DATASETS.register(family="natural")
def source_reference() -> RawDataset:
    """Natural-photo patches from photos no target uses: the source reference for domain distances."""
    return photo_patches(SOURCE_REFERENCE_IMAGES, counts=(40, 10, 10), seed=1)


@DATASETS.register(family="characters")
def digits() -> RawDataset:
    """sklearn's 1,797 real handwritten digits (8x8): far from the source."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = _rgb(np.rint(d.images * (255 / 16)).astype(np.uint8))
    return RawDataset(split_stratified(x, d.target.astype(np.int64)), [str(i) for i in range(10)])


def _fonts_with_latin() -> list[str]:
    import matplotlib
    from matplotlib.ft2font import FT2Font

    paths = sorted(glob.glob(os.path.join(matplotlib.get_data_path(), "fonts", "ttf", "*.ttf")))
    symbol_fonts = ("LastResort", "cmex", "cmsy")  # map Latin code points to symbols or placeholder boxes
    return [p for p in paths if not os.path.basename(p).startswith(symbol_fonts)
            and all(FT2Font(p).get_char_index(ord(ch)) for ch in GLYPH_CLASSES)]


GLYPH_SPLIT_FONTS = (13, 3, 6)  # fonts in train, val, test: no font in two splits, 600 test glyphs (1 = 0.17 pp)


def glyph_fonts_by_split(seed: int = 0) -> dict[str, list[str]]:
    """Each font belongs to one split: a test glyph never has a same-font sibling in the training pool (a split by
    image left 96.6% of test glyphs with a same-font, same-letter sibling in train)."""
    fonts = _fonts_with_latin()
    order = [fonts[i] for i in np.random.default_rng(seed).permutation(len(fonts))]
    a, b = GLYPH_SPLIT_FONTS[0], GLYPH_SPLIT_FONTS[0] + GLYPH_SPLIT_FONTS[1]
    return {"train": sorted(order[:a]), "val": sorted(order[a:b]), "test": sorted(order[b:])}


@DATASETS.register(family="characters")
def glyphs(variants: PositiveInt = 5, size: Annotated[int, Field(ge=8)] = 64, seed: NonNegativeInt = 0) -> RawDataset:
    """Letters A-T rendered from matplotlib's bundled fonts with random affine variation: synthetic, far.
    Split by font (13 / 3 / 6 of the 22 fonts)."""
    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng(seed)
    splits = {}
    for split, fonts in glyph_fonts_by_split(seed).items():
        xs, ys = [], []
        for font_path in fonts:
            font = ImageFont.truetype(font_path, size=int(size * 0.6))
            for label, ch in enumerate(GLYPH_CLASSES):
                for _ in range(variants):
                    canvas = Image.new("L", (size, size), 0)
                    ImageDraw.Draw(canvas).text((size / 2, size / 2), ch, fill=255, font=font, anchor="mm")
                    angle, scale = rng.uniform(-20, 20), rng.uniform(0.75, 1.1)
                    dx, dy = rng.uniform(-0.1, 0.1, size=2) * size
                    # Pillow defines Image.BILINEAR at import through globals(); its inline annotations lack it
                    canvas = canvas.rotate(angle, resample=Image.BILINEAR,  # type: ignore[attr-defined]
                                           translate=(dx, dy))
                    side = int(size / scale)
                    left = (size - side) // 2
                    canvas = canvas.crop((left, left, left + side, left + side)).resize(
                        (size, size), Image.BILINEAR)  # type: ignore[attr-defined]  # as above
                    xs.append(np.asarray(canvas))
                    ys.append(label)
        splits[split] = (_rgb(np.stack(xs)), np.array(ys, dtype=np.int64))
    return RawDataset(splits, list(GLYPH_CLASSES))


@DATASETS.register(family="natural")
def faces() -> RawDataset:
    """skimage's lfw_subset: 100 faces vs 100 non-faces (25x25 gray)."""
    from skimage.data import lfw_subset

    x = _rgb(lfw_subset())
    y = np.array([0] * 100 + [1] * 100, dtype=np.int64)
    return RawDataset(split_stratified(x, y), ["face", "non-face"])


