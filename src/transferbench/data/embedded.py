"""Targets that ship inside dependencies (no network): built deterministically, cached on disk.

Each builder returns {split: (images uint8 [N, H, W, 3], labels int64 [N])} for the splits
train (the pool k-shot subsets are drawn from), val and test, plus the class names.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError
from ..paths import cache_dir
from ..registry import Registry

DATASETS = Registry("dataset")
SPLITS = ("train", "val", "test")
VERSION = 2  # bump when a builder changes, so stale caches are not read (2: glyphs split by font)

# skimage photos and textures: targets never use the source-reference group, so "near" is not "identical".
TEXTURE_IMAGES = ["brick", "grass", "gravel", "coffee", "chelsea", "astronaut", "rocket", "coins", "moon",
                  "immunohistochemistry"]
SOURCE_REFERENCE_IMAGES = ["camera", "clock", "hubble_deep_field", "retina", "cell"]
GLYPH_CLASSES = "ABCDEFGHIJKLMNOPQRST"


@dataclass
class RawDataset:
    splits: dict[str, tuple[np.ndarray, np.ndarray]]
    classes: list[str]

    @property
    def digest(self) -> str:
        """SHA-256 of every array and class name: what the cache file is checked against, and what
        identifies the data in every derived cache key (features), whatever the dataset is called."""
        import hashlib

        h = hashlib.sha256("\n".join(self.classes).encode())
        for split in SPLITS:
            for a in self.splits[split]:
                h.update(f"{split}{a.dtype}{a.shape}".encode())
                h.update(np.ascontiguousarray(a).data)
        return h.hexdigest()


def _rgb(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype != np.uint8:
        a = np.clip(np.rint(a * (255.0 / a.max())), 0, 255).astype(np.uint8)
    if a.ndim == 2 or (a.ndim == 3 and a.shape[-1] not in (3, 4)):
        return np.repeat(a[..., None], 3, axis=-1)
    return a[..., :3]


def _split_stratified(x: np.ndarray, y: np.ndarray, fractions=(0.6, 0.15), seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    parts: dict[str, list] = {s: [] for s in SPLITS}
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        a, b = int(len(idx) * fractions[0]), int(len(idx) * (fractions[0] + fractions[1]))
        for split, sel in zip(SPLITS, (idx[:a], idx[a:b], idx[b:])):
            parts[split].append(sel)
    return {s: (x[np.sort(np.concatenate(p))], y[np.sort(np.concatenate(p))]) for s, p in parts.items()}


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


@DATASETS.register()
def textures() -> RawDataset:
    """Natural photo and texture patches (10 classes): the target nearest the ImageNet source."""
    return photo_patches(TEXTURE_IMAGES)


@DATASETS.register()
def source_reference() -> RawDataset:
    """Natural-photo patches from photos no target uses: the source reference for domain distances."""
    return photo_patches(SOURCE_REFERENCE_IMAGES, counts=(40, 10, 10), seed=1)


@DATASETS.register()
def digits() -> RawDataset:
    """sklearn's 1,797 real handwritten digits (8x8): far from the source."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = _rgb(np.rint(d.images * (255 / 16)).astype(np.uint8))
    return RawDataset(_split_stratified(x, d.target.astype(np.int64)), [str(i) for i in range(10)])


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


@DATASETS.register()
def glyphs(variants: int = 5, size: int = 64, seed: int = 0) -> RawDataset:
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
                    canvas = canvas.rotate(angle, resample=Image.BILINEAR, translate=(dx, dy))
                    side = int(size / scale)
                    left = (size - side) // 2
                    canvas = canvas.crop((left, left, left + side, left + side)).resize((size, size), Image.BILINEAR)
                    xs.append(np.asarray(canvas))
                    ys.append(label)
        splits[split] = (_rgb(np.stack(xs)), np.array(ys, dtype=np.int64))
    return RawDataset(splits, list(GLYPH_CLASSES))


@DATASETS.register()
def faces() -> RawDataset:
    """skimage's lfw_subset: 100 faces vs 100 non-faces (25x25 gray)."""
    from skimage.data import lfw_subset

    x = _rgb(lfw_subset())
    y = np.array([0] * 100 + [1] * 100, dtype=np.int64)
    return RawDataset(_split_stratified(x, y), ["face", "non-face"])


def load_raw(name: str, options: dict | None = None) -> RawDataset:
    """Build once, then read from the on-disk cache. The cache key holds the dataset's options and, for
    data in a folder, a fingerprint of its files (names, sizes, mtimes): an edited folder is read anew.
    Each cache file carries the digest of its arrays, checked on every read; a damaged file is rebuilt."""
    import hashlib
    import inspect
    import json

    builder = DATASETS.get(name, "targets.dataset")
    options = options or {}
    unknown = set(options) - set(inspect.signature(builder).parameters)
    if unknown:
        raise ConfigError("targets.options", f"dataset '{name}' takes no option(s) {sorted(unknown)}",
                          f"its options are {sorted(inspect.signature(builder).parameters) or 'none'}")
    key = json.dumps({"options": options, "files": _folder_fingerprints(options)}, sort_keys=True)
    path = cache_dir("data") / f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}-v{VERSION}.npz"
    cached = _read_cache(path)
    if cached is not None:
        return cached
    raw = builder(**options)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
    arrays = {f"{k}_{s}": v for s in SPLITS for k, v in zip("xy", raw.splits[s])}
    try:
        np.savez(tmp, classes=np.array(raw.classes), digest=np.array(raw.digest), **arrays)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return raw


def _folder_fingerprints(options: dict) -> dict:
    """Fingerprints of the folders a dataset reads (an ImageFolder's `path`, a torchvision dataset's `root`),
    so that adding, removing or editing files invalidates the cached arrays."""
    from .external import folder_fingerprint

    out = {}
    if isinstance(options.get("path"), str) and os.path.isdir(options["path"]):
        out["path"] = folder_fingerprint(options["path"])  # refuses links and bad layouts, as the reader does
    if isinstance(options.get("root"), str) and os.path.isdir(options["root"]):
        out["root"] = _tree_fingerprint(options["root"])
    return out


def _tree_fingerprint(root: str) -> str:
    """SHA-256 of (relative path, size, mtime) of every file under root: cheap, reads no content."""
    import hashlib

    h = hashlib.sha256()
    for folder, dirs, files in sorted(os.walk(root)):
        dirs.sort()
        for name in sorted(files):
            st = os.stat(os.path.join(folder, name), follow_symlinks=False)
            h.update(f"{os.path.relpath(os.path.join(folder, name), root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _read_cache(path) -> RawDataset | None:
    """The cached dataset, or None (absent, or damaged: then removed, and the caller rebuilds it)."""
    import sys
    import zipfile

    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            raw = RawDataset({s: (z[f"x_{s}"], z[f"y_{s}"]) for s in SPLITS}, z["classes"].tolist())
            stored = str(z["digest"])
        if raw.digest == stored:
            return raw
        problem = "its content does not match its digest"
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        problem = f"unreadable ({type(e).__name__})"
    print(f"warning: data cache {path} is damaged ({problem}); rebuilding it", file=sys.stderr)
    path.unlink(missing_ok=True)
    return None


def _register_external() -> None:
    """torchvision datasets by name and ImageFolder trees: the user's data on disk (see external.py)."""
    from . import external

    def make(name):
        def builder(root: str | None = None, download: bool = False, store_size: int = 64) -> RawDataset:
            if not root:
                raise ConfigError("targets.options.root", f"dataset '{name}' needs a root folder",
                                  "add options: {root: /path/to/data, download: true}")
            return external.torchvision_dataset(name, root, download, store_size)
        builder.__doc__ = f"torchvision's {external.TORCHVISION[name][0]} (options: root, download, store_size)"
        return builder

    for name in external.TORCHVISION:
        DATASETS.register(name)(make(name))

    @DATASETS.register("imagefolder")
    def imagefolder(path: str | None = None, store_size: int = 64) -> RawDataset:
        """Any ImageFolder tree (options: path, store_size)."""
        if not path:
            raise ConfigError("targets.options.path", "dataset 'imagefolder' needs a path",
                              "add options: {path: /data/my_images}")
        return external.image_folder(path, store_size)


_register_external()
