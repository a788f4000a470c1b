"""Targets on disk: torchvision datasets by name, and any ImageFolder tree.

Each is read once through torchvision's own dataset class, resized to `store_size` and kept as
uint8 arrays (the same RawDataset the embedded targets give), then cached like them. Splits follow
the dataset's official ones; where it has no validation split, a stratified 10% of its training
split becomes val (VTAB's 800/200 becomes 80/20 of the training split you pass); where it has
no split at all (EuroSAT, ImageFolder without train/val/test folders), a stratified 60/15/25.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .embedded import SPLITS, RawDataset, _split_stratified


def _arrays(ds, store_size: int) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image

    xs, ys = [], []
    for i in range(len(ds)):
        img, label = ds[i]
        img = img.convert("RGB")
        if img.size != (store_size, store_size):
            img = img.resize((store_size, store_size), Image.BILINEAR)
        xs.append(np.asarray(img, dtype=np.uint8))
        ys.append(int(label))
    return np.stack(xs), np.asarray(ys, dtype=np.int64)


def _carve_val(train: tuple[np.ndarray, np.ndarray], fraction: float = 0.1, seed: int = 0):
    x, y = train
    parts = _split_stratified(x, y, fractions=(1 - fraction, fraction), seed=seed)
    return parts["train"], parts["val"]


# name -> (torchvision class, {split: constructor kwargs}); a missing "val" is carved from "train".
TORCHVISION = {
    "cifar10": ("CIFAR10", {"train": {"train": True}, "test": {"train": False}}),
    "cifar100": ("CIFAR100", {"train": {"train": True}, "test": {"train": False}}),
    "svhn": ("SVHN", {"train": {"split": "train"}, "test": {"split": "test"}}),
    "stl10": ("STL10", {"train": {"split": "train"}, "test": {"split": "test"}}),
    "flowers102": ("Flowers102", {"train": {"split": "train"}, "val": {"split": "val"}, "test": {"split": "test"}}),
    "dtd": ("DTD", {"train": {"split": "train"}, "val": {"split": "val"}, "test": {"split": "test"}}),
    "oxford_pets": ("OxfordIIITPet", {"train": {"split": "trainval"}, "test": {"split": "test"}}),
    "eurosat": ("EuroSAT", {"all": {}}),
}


def torchvision_dataset(name: str, root: str, download: bool = False, store_size: int = 64) -> RawDataset:
    import torchvision.datasets as tvd

    cls_name, split_kwargs = TORCHVISION[name]
    cls = getattr(tvd, cls_name)
    loaded = {split: cls(root=root, download=download, **kw) for split, kw in split_kwargs.items()}
    arrays = {split: _arrays(ds, store_size) for split, ds in loaded.items()}
    first = next(iter(loaded.values()))
    classes = [str(c) for c in getattr(first, "classes", [])] or [str(i) for i in range(int(max(a[1].max() for a in arrays.values())) + 1)]
    if "all" in arrays:
        return RawDataset(_split_stratified(*arrays["all"]), classes)
    if "val" not in arrays:
        arrays["train"], arrays["val"] = _carve_val(arrays["train"])
    return RawDataset({s: arrays[s] for s in SPLITS}, classes)


def image_folder(path: str, store_size: int = 64) -> RawDataset:
    """An ImageFolder tree: `path/CLASS/*.jpg`, or `path/{train,val,test}/CLASS/*.jpg`."""
    from torchvision.datasets import ImageFolder

    root = Path(path)
    if all((root / s).is_dir() for s in ("train", "test")):
        sets = {s: ImageFolder(str(root / s)) for s in SPLITS if (root / s).is_dir()}
        arrays = {s: _arrays(ds, store_size) for s, ds in sets.items()}
        if "val" not in arrays:
            arrays["train"], arrays["val"] = _carve_val(arrays["train"])
        return RawDataset({s: arrays[s] for s in SPLITS}, sets["train"].classes)
    ds = ImageFolder(str(root))
    return RawDataset(_split_stratified(*_arrays(ds, store_size)), ds.classes)
