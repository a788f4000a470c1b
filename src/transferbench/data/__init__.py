"""Targets as in-memory tensors: images resized to the study's size, shifted once, labels.

Data flow: raw uint8 arrays (raw.py; built by embedded.py or external.py) -> float [N, 3, S, S] in [0, 1]
-> shift (shifts.py).
Normalisation belongs to the backbone (its weights' mean/std), not to the data.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from transferbench.core.study import condition_name
from transferbench.data import embedded, external, procedural  # noqa: F401  (each registers its builders in raw.DATASETS)
from transferbench.data.raw import DATASETS, SPLITS, fingerprints, load_raw
from transferbench.data.sampling import class_counts, nested_kshot
from transferbench.data.shifts import SHIFTS, apply_shift

__all__ = ["DATASETS", "SHIFTS", "Target", "load_target", "nested_kshot", "class_counts"]


@dataclass(frozen=True)
class Target:
    name: str
    x: dict[str, torch.Tensor]  # split -> float32 [N, 3, S, S] in [0, 1]
    y: dict[str, torch.Tensor]  # split -> int64 [N]
    classes: list[str]
    key: str  # what the tensors are: a digest of the raw data, the shift and the size (feature-cache keys use it)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def to_tensor(images: np.ndarray, size: int) -> torch.Tensor:
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255)
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x.clamp_(0, 1).contiguous()


def load_target(dataset: str, shift: str | None, severity: int, image_size: int, options: dict | None = None,
                name: str | None = None) -> Target:
    """`name` labels the target in records (default: the dataset's name)."""
    options = options or {}
    files = json.dumps(fingerprints(dataset, options))  # in the memo key: a folder edited mid-process is read anew
    return _load_target(dataset, shift, severity, image_size, json.dumps(options, sort_keys=True), name, files)


@lru_cache(maxsize=16)
def _load_target(dataset: str, shift: str | None, severity: int, image_size: int, options: str, name: str | None,
                 files: str) -> Target:
    raw = load_raw(dataset, json.loads(options))
    xs, ys = {}, {}
    for split in SPLITS:
        images, labels = raw.splits[split]
        x = to_tensor(images, image_size)
        if shift:  # fixed corrupted copy: the seed depends on the condition and split only
            x = apply_shift(x, shift, severity, seed=zlib.crc32(f"{dataset}/{shift}/{severity}/{split}".encode()))
        xs[split], ys[split] = x, torch.from_numpy(labels)
    label = condition_name(name or dataset, shift, severity)
    key = hashlib.sha256(json.dumps([raw.digest, shift, severity, image_size]).encode()).hexdigest()
    return Target(label, xs, ys, raw.classes, key)


# an attribute set on a function, which mypy does not model
load_target.cache_clear = _load_target.cache_clear  # type: ignore[attr-defined]  # tests rebuild from the disk cache
