"""Targets on disk: torchvision datasets by name, and any ImageFolder tree.

A torchvision dataset is read once through torchvision's own class, an ImageFolder tree through our
own reader (image_folder below: it refuses links, bad files and duplicates); either is resized to
`store_size`, kept as uint8 arrays (the same RawDataset the embedded targets give) and cached like
them. Splits follow the dataset's official ones; where it has no validation split, a stratified 10% of
its training split becomes val (VTAB's 800/200 becomes 80/20 of the training split you pass); where it
has no split at all (EuroSAT, ImageFolder without train/val/test folders), a stratified 60/15/25.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import NoReturn

import numpy as np
from pydantic import PositiveInt

from transferbench.core.errors import ConfigError
from transferbench.data.raw import DATASETS, SPLITS, RawDataset, split_stratified, tree_fingerprint


def _resized(img, store_size: int) -> np.ndarray:
    from PIL import Image

    img = img.convert("RGB")
    if img.size != (store_size, store_size):
        # Pillow defines Image.BILINEAR at import through globals(); its inline annotations lack it
        img = img.resize((store_size, store_size), Image.BILINEAR)  # type: ignore[attr-defined]
    return np.asarray(img, dtype=np.uint8)


def _arrays(ds, store_size: int) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for i in range(len(ds)):
        img, label = ds[i]
        xs.append(_resized(img, store_size))
        ys.append(int(label))
    return np.stack(xs), np.asarray(ys, dtype=np.int64)


def _carve_val(train: tuple[np.ndarray, np.ndarray], fraction: float = 0.1, seed: int = 0):
    x, y = train
    parts = split_stratified(x, y, fractions=(1 - fraction, fraction), seed=seed)
    return parts["train"], parts["val"]


# name -> (torchvision class, {split: constructor kwargs}); a missing "val" is carved from "train".
TORCHVISION: dict[str, tuple[str, dict[str, dict[str, str | bool]]]] = {
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
    n_classes = int(max(a[1].max() for a in arrays.values())) + 1
    classes = [str(c) for c in getattr(first, "classes", [])] or [str(i) for i in range(n_classes)]
    if "all" in arrays:
        return RawDataset(split_stratified(*arrays["all"]), classes)
    if "val" not in arrays:
        arrays["train"], arrays["val"] = _carve_val(arrays["train"])
    return RawDataset({s: arrays[s] for s in SPLITS}, classes)


# ImageFolder trees are read by our own walk, not torchvision's: its walk follows links (a link loop once
# turned 180 files into 7,260, some labelled with another class) and it crashes on a bad file. Here every
# hostile tree is refused with a ConfigError naming the file or class, before anything is cached.

FIELD = "targets.options.path"
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
LINK_FIX = "replace the link by the real file or remove it"
BAD_IMAGE_FIX = "replace it by a valid image or remove it"


def _refuse(problem: str, fix: str) -> NoReturn:
    raise ConfigError(FIELD, problem, fix)


def _name(path: Path, root: Path) -> str:
    """A path as the user knows it, relative to the root, quoted: repr keeps a newline in a hostile
    file name from breaking the one-line error."""
    rel = path.relative_to(root).as_posix()
    return repr(str(root) if rel == "." else rel)


def _entries(folder: Path, root: Path) -> list:
    """A folder's visible entries, sorted by name. Links are refused, never followed: one can loop or
    reach into another class or split."""
    try:
        with os.scandir(folder) as it:
            entries = sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
    except OSError as exc:
        _refuse(f"cannot list {_name(folder, root)} ({exc.strerror})", "make the folder readable")
    for e in entries:
        if e.is_symlink():
            _refuse(f"{_name(Path(e.path), root)} is a symbolic link", LINK_FIX)
    return entries


def _images(class_dir: Path, root: Path) -> list[Path]:
    """Image files anywhere under one class folder (subfolders included, as torchvision read them);
    files with other extensions are skipped."""
    found, todo = [], [class_dir]
    while todo:  # a loop, not recursion: a hostile tree may nest deeper than Python's recursion limit
        for e in _entries(todo.pop(), root):
            if e.is_dir(follow_symlinks=False):
                todo.append(Path(e.path))
            elif os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS:
                if not e.is_file(follow_symlinks=False):  # a FIFO named .png would hang the reader
                    _refuse(f"{_name(Path(e.path), root)} is not a regular file", BAD_IMAGE_FIX)
                found.append(Path(e.path))
    return sorted(found)


def _classes(folder: Path, root: Path) -> dict[str, list[Path]]:
    """Class name -> its images, one visible subfolder per class in sorted order (the label order)."""
    classes = {e.name: _images(Path(e.path), root) for e in _entries(folder, root) if e.is_dir(follow_symlinks=False)}
    if not classes:
        _refuse(f"{_name(folder, root)} holds no class folders",
                "put each class's images in its own subfolder: CLASS/image.png")
    for name, files in classes.items():
        if not files:
            _refuse(f"class folder {_name(folder / name, root)} holds no images "
                    f"({' '.join(sorted(IMAGE_EXTENSIONS))})", "add images to it or remove it")
    return classes


def _check_same_classes(layout: dict) -> None:
    """Split folders must hold the same classes: labels are indices into the sorted class list."""
    expected = set(layout["train"])
    for split, classes in layout.items():
        for names, where, absent in ((expected - set(classes), "train/", f"{split}/"),
                                     (set(classes) - expected, f"{split}/", "train/")):
            if names:
                _refuse(f"class(es) {', '.join(map(repr, sorted(names)))} in {where} but not in {absent}",
                        "give train/, val/ and test/ the same class folders")


def _layout(root: Path) -> dict:
    """{split: {class: images}} for `root/{train,val,test}/CLASS/` (val optional), or {None: {class: images}}
    for `root/CLASS/`. Only folder listings are read, no file contents."""
    if not root.is_dir():
        _refuse(f"{str(root)!r} is not a folder", "give the folder that holds the class folders")
    subfolders = {e.name for e in _entries(root, root) if e.is_dir(follow_symlinks=False)}
    if {"train", "test"} <= subfolders:
        layout = {s: _classes(root / s, root) for s in SPLITS if s in subfolders}
        _check_same_classes(layout)
        return layout
    return {None: _classes(root, root)}


def _carved(x: np.ndarray, y: np.ndarray) -> dict:
    return dict(zip(("train", "val"), _carve_val((x, y))))


def _split_sizes(split, n: int) -> list[int]:
    """How many of one class's n images each split gets: the real split, run on n dummy labels, so this
    check cannot drift from the arithmetic that places the images."""
    y = np.zeros(n, dtype=np.int64)
    return [len(labels) for _, labels in split(y, y).values()]


def _check_class_sizes(classes: dict, split, what: str) -> None:
    """Every class needs an image in every split: an empty split would crash or silently skew training."""
    for name, files in classes.items():
        if min(_split_sizes(split, len(files))) == 0:
            need = next(n for n in range(1, 1000) if min(_split_sizes(split, n)) > 0)
            _refuse(f"class {name!r} has {len(files)} image(s); {what} needs at least {need} per class "
                    "so that every split gets one", f"add images to {name!r} or remove the class")


def _open(path: Path, name: str):
    try:  # O_NOFOLLOW: a file swapped for a link after the walk is still not followed
        return os.fdopen(os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0)), "rb")
    except OSError as exc:
        _refuse(f"cannot open {name} ({exc.strerror})", "make it readable or remove it")


def _sha256(f) -> str:
    h = hashlib.sha256()
    for block in iter(lambda: f.read(1 << 20), b""):  # streamed: a huge file must not fill memory
        h.update(block)
    return h.hexdigest()


def _decode(f, name: str, store_size: int) -> np.ndarray:
    """One image, decoded in full and resized. A decompression bomb's warning counts as an error."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(f) as img:
                return _resized(img, store_size)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        _refuse(f"{name} is too large to decode safely ({exc})", "shrink it or remove it")
    except UnidentifiedImageError:
        _refuse(f"{name} is not an image in any format PIL reads", BAD_IMAGE_FIX)
    except Exception as exc:  # PIL raises many types on malformed input: OSError, SyntaxError, struct.error...
        _refuse(f"{name} cannot be decoded ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})",
                BAD_IMAGE_FIX)


def _read(path: Path, root: Path, store_size: int, seen: dict) -> np.ndarray:
    """One file: refused if empty or if its bytes already appeared (a copy or hard link would put the
    same image in two classes or splits); `seen` maps sha256 -> the first path."""
    name = _name(path, root)
    with _open(path, name) as f:
        if os.fstat(f.fileno()).st_size == 0:
            _refuse(f"{name} is empty (0 bytes)", BAD_IMAGE_FIX)
        digest = _sha256(f)
        if digest in seen:
            _refuse(f"{name} has the same content as {_name(seen[digest], root)}", "remove one of the copies")
        seen[digest] = path
        f.seek(0)
        return _decode(f, name, store_size)


def _read_layout(layout: dict, root: Path, store_size: int) -> dict:
    """{split: (images, labels)}; labels index the sorted class list, the same in every split."""
    seen: dict[str, Path] = {}
    arrays = {}
    for split, classes in layout.items():
        pairs = [(_read(p, root, store_size, seen), label)
                 for label, files in enumerate(classes.values()) for p in files]
        arrays[split] = (np.stack([x for x, _ in pairs]), np.asarray([y for _, y in pairs], dtype=np.int64))
    return arrays


def image_folder(path: str, store_size: int = 64) -> RawDataset:
    """An ImageFolder tree: `path/CLASS/*.png` (a stratified 60/15/25 split) or `path/{train,val,test}/CLASS/*.png`
    (val optional: 10% of train, stratified). Images: .png .jpg .jpeg .bmp .gif .webp .tif .tiff, any case,
    in subfolders of a class too; other files and hidden entries ('.name') are skipped.

    Refused with a ConfigError naming the file or class, before anything is cached (problems of the
    layout and size before any file is opened):
    - a symbolic link anywhere in the tree (file or folder; the root itself may be one): links are never
      followed; fix: replace the link by the real file or remove it;
    - no class folders; a class folder without images; split folders whose classes differ;
    - a class too small for every split to get an image (the minimum comes from the split arithmetic);
    - an image file that is empty, not a regular file, cannot be decoded in full, or is a decompression bomb;
    - the same bytes twice anywhere in the tree (a copy or hard link): fix: remove one of the copies.
    """
    root = Path(path)
    layout = _layout(root)
    if None in layout:
        _check_class_sizes(layout[None], split_stratified, "the 60/15/25 split of a folder without train/ and test/")
    elif "val" not in layout:
        _check_class_sizes(layout["train"], _carved, "carving val/ out of train/")
    arrays = _read_layout(layout, root, store_size)
    classes = list(next(iter(layout.values())))
    if None in arrays:
        return RawDataset(split_stratified(*arrays[None]), classes)
    if "val" not in arrays:
        arrays["train"], arrays["val"] = _carve_val(arrays["train"])
    return RawDataset({s: arrays[s] for s in SPLITS}, classes)


def folder_fingerprint(path: str) -> str:
    """A cheap key for a tree's content (for cache keys): sha256 over the sorted (relative path, size,
    mtime_ns) of every image file image_folder would read. No file is opened, one stat per file; adding,
    removing, renaming or rewriting an image changes it (a same-size rewrite that restores the mtime does
    not). A tree refused by its layout (links, no or empty classes, split folders differing) raises the same
    ConfigError as image_folder; undecodable or duplicate files are only found when reading."""
    root = Path(path)
    rows = []
    for classes in _layout(root).values():
        for files in classes.values():
            for f in files:
                st = os.lstat(f)
                rows.append([f.relative_to(root).as_posix(), st.st_size, st.st_mtime_ns])
    return hashlib.sha256(json.dumps(sorted(rows)).encode()).hexdigest()


def _path_fingerprint(options: dict) -> dict:
    path = options.get("path")  # refuses links and bad layouts, as the reader does
    return {"path": folder_fingerprint(path)} if isinstance(path, str) and os.path.isdir(path) else {}


def _root_fingerprint(options: dict) -> dict:
    root = options.get("root")
    return {"root": tree_fingerprint(root)} if isinstance(root, str) and os.path.isdir(root) else {}


def _register() -> None:
    """torchvision datasets by name and ImageFolder trees: the user's data on disk."""
    def make(name):
        def builder(root: str | None = None, download: bool = False, store_size: PositiveInt = 64) -> RawDataset:
            if not root:
                raise ConfigError("targets.options.root", f"dataset '{name}' needs a root folder",
                                  "add options: {root: /path/to/data, download: true}")
            return torchvision_dataset(name, root, download, store_size)
        builder.__doc__ = f"torchvision's {TORCHVISION[name][0]} (options: root, download, store_size)"
        return builder

    for name in TORCHVISION:  # VTAB's grouping: EuroSAT (remote sensing) is "specialized", the rest natural
        family = "specialized" if name == "eurosat" else "natural"
        DATASETS.register(name, fingerprint=_root_fingerprint, family=family)(make(name))

    @DATASETS.register("imagefolder", fingerprint=_path_fingerprint)
    def imagefolder(path: str | None = None, store_size: PositiveInt = 64) -> RawDataset:
        """Any ImageFolder tree (options: path, store_size)."""
        if not path:
            raise ConfigError("targets.options.path", "dataset 'imagefolder' needs a path",
                              "add options: {path: /data/my_images}")
        return image_folder(path, store_size)


_register()
