"""Structured targets drawn procedurally (VTAB's "structured" group: counting, position, orientation): the label is
a geometric fact about a synthetic scene, not a kind of object, so ImageNet features are expected to help little
(VTAB-1k: +8.5 pp on structured tasks against +45.6 on natural ones).

Each split is drawn from its own random stream, and every scene is continuous (positions, sizes and angles are
real-valued), so no image appears in two splits; the contract tests check it.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from PIL import Image, ImageDraw
from pydantic import NonNegativeInt

from transferbench.data.raw import DATASETS, SPLITS, RawDataset

SIDE = 64
PER_CLASS = {"train": 100, "val": 40, "test": 50}  # scratch curves up to 100 per class; >= 200 test images


def _canvas(rng: np.random.Generator) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    """A dark background with a random tint, so colour carries no label."""
    tint = tuple(int(v) for v in rng.integers(0, 60, size=3))
    img = Image.new("RGB", (SIDE, SIDE), tint)
    return img, ImageDraw.Draw(img)


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(120, 256, size=3))  # type: ignore[return-value]


def _draw(make_scene, classes: list[str], seed: int) -> RawDataset:
    """Scenes of every class, PER_CLASS of each per split, each split from its own stream."""
    splits = {}
    for k, split in enumerate(SPLITS):
        rng = np.random.default_rng([seed, k])
        xs, ys = [], []
        for label in range(len(classes)):
            for _ in range(PER_CLASS[split]):
                xs.append(np.asarray(make_scene(label, rng)))
                ys.append(label)
        splits[split] = (np.stack(xs), np.array(ys, dtype=np.int64))
    return RawDataset(splits, classes)


@DATASETS.register(family="structured")
def counting(most: Literal[4, 5, 6] = 6, seed: NonNegativeInt = 0) -> RawDataset:
    """How many objects (1 to 6 discs and squares of random size and colour, apart): a CLEVR-count-like
    structured task. Object sizes vary so that the painted area does not give the count away."""
    def scene(label: int, rng: np.random.Generator) -> Image.Image:
        img, draw = _canvas(rng)
        placed: list[tuple[float, float, float]] = []
        while len(placed) < label + 1:
            r = rng.uniform(3, 8)
            cx, cy = rng.uniform(r + 1, SIDE - r - 1, size=2)
            if all(max(abs(cx - x), abs(cy - y)) > r + s + 2 for x, y, s in placed):  # boxes 2 px apart
                placed.append((cx, cy, r))
                box = (cx - r, cy - r, cx + r, cy + r)
                (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=_colour(rng))
        return img

    return _draw(scene, [str(i) for i in range(1, most + 1)], seed)


@DATASETS.register(family="structured")
def sprites(label: Literal["position", "orientation"] = "position", seed: NonNegativeInt = 0) -> RawDataset:
    """One elongated sprite (an ellipse or a bar, random colour, scale, position and angle) per image, dSprites-like:
    the label is its horizontal position (5 bands) or its orientation (6 bins of 30 degrees), the other factors
    random. Angles and positions keep a margin from the bin edges, as a label a person could give."""
    bins = 5 if label == "position" else 6

    def scene(k: int, rng: np.random.Generator) -> Image.Image:
        img, draw = _canvas(rng)
        length, width = rng.uniform(14, 22), rng.uniform(4, 7)
        if label == "orientation":
            angle, x = np.deg2rad(30 * k + rng.uniform(-10, 10)), rng.uniform(20, SIDE - 20)
        else:
            band = (SIDE - 24) / bins
            angle, x = rng.uniform(0, np.pi), 12 + band * (k + rng.uniform(0.15, 0.85))
        y = rng.uniform(20, SIDE - 20)
        corners = np.array([[-length, -width], [length, -width], [length, width], [-length, width]]) / 2
        if rng.random() < 0.5:  # an ellipse: its outline as a polygon, so it rotates like the bar
            t = np.linspace(0, 2 * np.pi, 32, endpoint=False)
            corners = np.stack([length / 2 * np.cos(t), width / 2 * np.sin(t)], 1)
        c, s = np.cos(angle), np.sin(angle)
        rot = np.array([[c, s], [-s, c]])  # counter-clockwise as seen (image y points down)
        draw.polygon([tuple(p) for p in corners @ rot.T + [x, y]], fill=_colour(rng))
        return img

    names = [f"x band {i + 1}" for i in range(bins)] if label == "position" else \
        [f"{30 * i} deg" for i in range(bins)]
    return _draw(scene, names, seed)
