"""Raw datasets: the one type (uint8 images and labels per split, class names), the registry of builders, and
`load_raw`, which builds a dataset once and serves it from a checked on-disk cache. Builders live in
`embedded.py` (data shipped inside dependencies) and `external.py` (torchvision datasets, ImageFolder trees);
each registers itself here and imports nothing but this module.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import sys
import typing
import zipfile
from dataclasses import dataclass

import numpy as np

from transferbench.core.atomic import replacing
from transferbench.core.errors import ConfigError
from transferbench.core.paths import cache_dir
from transferbench.core.registry import Registry

# name -> builder(**options) -> RawDataset; metadata `fingerprint(options) -> dict` for data read from a folder, so
# that adding, removing or editing its files invalidates the cached arrays, and `family` (natural, characters,
# specialized or structured: VTAB's grouping, which the report's anchor findings compare).
DATASETS = Registry("dataset")
SPLITS = ("train", "val", "test")
VERSION = 2  # bump when a builder changes, so stale caches are not read (2: glyphs split by font)


@dataclass
class RawDataset:
    splits: dict[str, tuple[np.ndarray, np.ndarray]]
    classes: list[str]

    @property
    def digest(self) -> str:
        """SHA-256 of every array and class name: what the cache file is checked against, and what
        identifies the data in every derived cache key (features), whatever the dataset is called."""
        h = hashlib.sha256("\n".join(self.classes).encode())
        for split in SPLITS:
            for a in self.splits[split]:
                h.update(f"{split}{a.dtype}{a.shape}".encode())
                h.update(np.ascontiguousarray(a).data)
        return h.hexdigest()


def split_stratified(x: np.ndarray, y: np.ndarray, fractions=(0.6, 0.15), seed: int = 0) -> dict:
    """Per class: the first `fractions[0]` of a permutation to train, the next `fractions[1]` to val, the rest to
    test (each rounded down, see `cut_points`)."""
    rng = np.random.default_rng(seed)
    parts: dict[str, list] = {s: [] for s in SPLITS}
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        a, b = cut_points(len(idx), fractions)
        for split, sel in zip(SPLITS, (idx[:a], idx[a:b], idx[b:])):
            parts[split].append(sel)
    return {s: (x[np.sort(np.concatenate(p))], y[np.sort(np.concatenate(p))]) for s, p in parts.items()}


def cut_points(n: int, fractions: tuple[float, float]) -> tuple[int, int]:
    """Where one class's n shuffled images are cut into train | val | test: each share rounded down, except that a
    split with a positive share that rounding would leave empty takes one image from the split before it, where that
    one keeps at least one (60/15/25 of 5 images is 2/1/2, not 3/0/2; of 3 it is 1/1/1)."""
    a, b = int(n * fractions[0]), int(n * (fractions[0] + fractions[1]))
    if 1 - fractions[0] - fractions[1] > 1e-9 and b == n and b - a >= 2:  # test takes one from val
        b -= 1
    if fractions[1] > 0 and b == a and a >= 2:  # val takes one from train
        a -= 1
    return a, b


def load_raw(name: str, options: dict | None = None) -> RawDataset:
    """Build once, then read from the on-disk cache. The cache key holds the dataset's options and, for
    data in a folder, a fingerprint of its files (names, sizes, mtimes): an edited folder is read anew.
    Each cache file carries the digest of its arrays, checked on every read; a damaged file is rebuilt."""
    builder = DATASETS.get(name, "targets.dataset")
    options = options or {}
    check_options(name, builder, options)
    key = json.dumps({"options": options, "files": fingerprints(name, options)}, sort_keys=True)
    path = cache_dir("data") / f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}-v{VERSION}.npz"
    cached = _read_cache(path)
    if cached is not None:
        return cached
    raw = builder(**options)
    arrays = {f"{k}_{s}": v for s in SPLITS for k, v in zip("xy", raw.splits[s])}
    with replacing(path) as tmp, open(tmp, "xb") as f:
        np.savez(f, classes=np.array(raw.classes), digest=np.array(raw.digest), **arrays)
    return raw


def check_options(name: str, builder, options: dict) -> None:
    """Every option is one the builder takes, of the type (and range) its signature declares, checked strictly
    (`path: 5` is not a path, `store_size: 0` not a size): refused here, not deep inside the builder."""
    from pydantic import TypeAdapter, ValidationError

    params = inspect.signature(builder).parameters
    unknown = set(options) - set(params)
    if unknown:
        raise ConfigError("targets.options", f"dataset '{name}' takes no option(s) {sorted(unknown)}",
                          f"its options are {sorted(params) or 'none'}")
    hints = typing.get_type_hints(builder, include_extras=True)
    for key, value in options.items():
        try:
            TypeAdapter(hints.get(key, typing.Any)).validate_python(value, strict=True)
        except ValidationError as e:
            default = params[key].default
            example = f", e.g. {key}: {json.dumps(default)}" if default not in (None, inspect.Parameter.empty) else ""
            raise ConfigError(f"targets.options.{key}", f"dataset '{name}': {value!r} is not a valid {key} "
                              f"({e.errors()[0]['msg'].lower()})", f"give a valid {key}{example}") from None


def fingerprints(name: str, options: dict) -> dict:
    """What identifies the files a dataset reads with these options (empty for data built from dependencies)."""
    fingerprint = DATASETS.meta(name).get("fingerprint") if name in DATASETS else None
    return fingerprint(options) if fingerprint else {}


def tree_fingerprint(root: str) -> str:
    """SHA-256 of (relative path, size, mtime) of every file under root: cheap, reads no content."""
    h = hashlib.sha256()
    for folder, dirs, files in sorted(os.walk(root)):
        dirs.sort()
        for name in sorted(files):
            st = os.stat(os.path.join(folder, name), follow_symlinks=False)
            h.update(f"{os.path.relpath(os.path.join(folder, name), root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _read_cache(path) -> RawDataset | None:
    """The cached dataset, or None (absent, or damaged: then removed, and the caller rebuilds it)."""
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


