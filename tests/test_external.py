"""Real data on disk, read through torchvision's own classes from files written in their formats,
and sources pretrained here: all offline."""

import os
import pickle

import numpy as np
import pytest
from PIL import Image

from transferbench.core.errors import ConfigError
from transferbench.data import load_raw, load_target


def write_cifar10(root, n_train=50, n_test=20):
    """The CIFAR-10 python pickle layout: data_batch_1..5, test_batch, batches.meta."""
    import torchvision.datasets as tvd

    folder = root / tvd.CIFAR10.base_folder
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, _ in tvd.CIFAR10.train_list + tvd.CIFAR10.test_list:
        n = n_test if name == "test_batch" else n_train // 5
        batch = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "labels": list(np.arange(n) % 10)}
        (folder / name).write_bytes(pickle.dumps(batch))
    meta = {"label_names": [f"class{i}" for i in range(10)]}
    (folder / tvd.CIFAR10.meta["filename"]).write_bytes(pickle.dumps(meta))


def test_cifar10_from_its_pickle_batches(tmp_path, monkeypatch):
    write_cifar10(tmp_path)
    import torchvision.datasets.cifar as cifar

    monkeypatch.setattr(cifar, "check_integrity", lambda *a, **k: True)  # our files do not have the real md5s
    raw = load_raw("cifar10", {"root": str(tmp_path), "store_size": 32})
    assert raw.classes == [f"class{i}" for i in range(10)]
    assert len(raw.splits["test"][0]) == 20 and raw.splits["train"][0].shape[1:] == (32, 32, 3)
    assert len(raw.splits["train"][0]) + len(raw.splits["val"][0]) == 50  # val carved from train
    t = load_target("cifar10", None, 0, 16, {"root": str(tmp_path), "store_size": 32})
    assert t.x["train"].shape[1:] == (3, 16, 16)


def write_image_folder(root, classes=("cat", "dog", "fox"), per_class=10, seed=0):
    rng = np.random.default_rng(seed)  # a different seed per split: the same bytes twice are refused
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(root / c / f"{i}.png")


def test_image_folder_tree(tmp_path):
    write_image_folder(tmp_path / "imgs")
    raw = load_raw("imagefolder", {"path": str(tmp_path / "imgs"), "store_size": 16})
    assert raw.classes == ["cat", "dog", "fox"]
    assert sum(len(raw.splits[s][1]) for s in ("train", "val", "test")) == 30
    assert raw.splits["train"][0].shape[1:] == (16, 16, 3)


def test_image_folder_with_split_folders(tmp_path):
    write_image_folder(tmp_path / "d" / "train", per_class=8)
    write_image_folder(tmp_path / "d" / "test", per_class=3, seed=1)
    raw = load_raw("imagefolder", {"path": str(tmp_path / "d"), "store_size": 16})
    assert len(raw.splits["test"][1]) == 9 and len(raw.splits["train"][1]) + len(raw.splits["val"][1]) == 24


def test_eurosat_is_an_image_folder_under_its_own_name(tmp_path):
    write_image_folder(tmp_path / "eurosat" / "2750", classes=("Forest", "River"), per_class=10)
    raw = load_raw("eurosat", {"root": str(tmp_path), "store_size": 16})
    assert raw.classes == ["Forest", "River"]


def test_dataset_options_are_checked():
    with pytest.raises(ConfigError, match="needs a root folder"):
        load_raw("cifar100", {})
    with pytest.raises(ConfigError, match="takes no option"):
        load_raw("digits", {"root": "x"})


def test_source_pretraining_trains_caches_and_serves_weights(tmp_path):
    from transferbench.core.study import load_study
    from transferbench.models.backbones import create_backbone
    from transferbench.training.source import ensure_checkpoints, weights_map

    study_file = tmp_path / "s.yaml"
    study_file.write_text("""name: s
backbones: [{model: tf_efficientnet_lite0, weights: "pretrain:faces"}]
targets: [{dataset: digits}]
grid: {frozen_depth: [all], n_per_class: [2], schedule: [constant], seed: [0]}
pretraining: {epochs: 1, batch_size: 32}
""")
    study = load_study(study_file)
    (resolved,) = weights_map(study).values()
    assert resolved.startswith("pretrain:faces:")
    log = []
    ensure_checkpoints(study, log=log.append)
    assert any("pretraining" in line for line in log)
    ensure_checkpoints(study, log=log.append)  # cached: nothing trained twice
    assert sum("pretraining" in line for line in log) == 1
    bb = create_backbone("tf_efficientnet_lite0", resolved, num_classes=10, seed=0)
    assert bb.source_head.out_features == 2  # faces vs non-faces: the source's own head, kept for LEEP
    assert bb.weights_id.startswith("source:")
    with pytest.raises(ConfigError, match="no pretrained source checkpoint"):
        create_backbone("tf_efficientnet_lite0", "pretrain:faces:0000", num_classes=10, seed=0)


# --- ImageFolder trees that must be refused: (case, how to spoil a good tree, what the error must name) ---

def png_bytes(seed=99):
    import io

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def flat(spoil):
    """A good flat tree (cat, dog, fox; 10 images each), then `spoil(root)`."""
    def build(root):
        write_image_folder(root)
        spoil(root)
    return build


def split(spoil=lambda root: None, train=("cat", "dog", "fox"), test=("cat", "dog", "fox")):
    """A tree with train/ (4 images a class) and test/ (2 a class), then `spoil(root)`."""
    def build(root):
        write_image_folder(root / "train", classes=train, per_class=4, seed=1)
        write_image_folder(root / "test", classes=test, per_class=2, seed=2)
        spoil(root)
    return build


def copy(src, dst):
    dst.write_bytes(src.read_bytes())


def keep_one(folder):
    for p in sorted(folder.iterdir())[1:]:
        p.unlink()


def mkdir(path):
    path.mkdir(parents=True)
    return path


def only_images_at_root(root):
    mkdir(root)
    (root / "a.png").write_bytes(png_bytes())


HOSTILE = [
    ("symlink loop to a parent dir", flat(lambda r: os.symlink(r, r / "cat" / "loop")),
     "'cat/loop' is a symbolic link"),
    ("symlinked file", flat(lambda r: os.symlink(r / "dog" / "0.png", r / "cat" / "link.png")),
     "'cat/link.png' is a symbolic link"),
    ("symlinked class folder", flat(lambda r: os.symlink(r / "cat", r / "lynx")), "'lynx' is a symbolic link"),
    ("zero-byte png", flat(lambda r: (r / "cat" / "empty.png").write_bytes(b"")), "'cat/empty.png' is empty"),
    ("text named .png", flat(lambda r: (r / "cat" / "notes.png").write_text("not an image\n")),
     "'cat/notes.png' is not an image"),
    ("truncated png", flat(lambda r: (r / "cat" / "cut.png").write_bytes(png_bytes()[:700])),
     "'cat/cut.png' cannot be decoded"),
    ("fifo named .png", flat(lambda r: os.mkfifo(r / "cat" / "pipe.png")), "'cat/pipe.png' is not a regular file"),
    ("newline in a bad file's name", flat(lambda r: (r / "cat" / "a\nb.png").write_text("x")), r"'cat/a\nb.png'"),
    ("empty class folder", flat(lambda r: mkdir(r / "emu")), "class folder 'emu' holds no images"),
    ("class folder without image files", flat(lambda r: (mkdir(r / "emu") / "notes.txt").write_text("x")),
     "class folder 'emu' holds no images"),
    ("class with one image", flat(lambda r: (mkdir(r / "emu") / "0.png").write_bytes(png_bytes())),
     "class 'emu' has 1 image(s); the 60/15/25 split of a folder without train/ and test/ needs at least 3"),
    ("duplicate content across two classes", flat(lambda r: copy(r / "cat" / "0.png", r / "dog" / "copy.png")),
     "'dog/copy.png' has the same content as 'cat/0.png'"),
    ("hard link across two classes", flat(lambda r: os.link(r / "cat" / "0.png", r / "dog" / "hard.png")),
     "'dog/hard.png' has the same content as 'cat/0.png'"),
    ("duplicate across train/ and test/",
     split(lambda r: copy(r / "train" / "cat" / "0.png", r / "test" / "cat" / "x.png")),
     "'test/cat/x.png' has the same content as 'train/cat/0.png'"),
    ("class missing from test/", split(test=("cat", "dog")), "class(es) 'fox' in train/ but not in test/"),
    ("extra class in test/", split(test=("cat", "dog", "emu", "fox")),
     "class(es) 'emu' in test/ but not in train/"),
    ("train class too small to carve val", split(lambda r: keep_one(r / "train" / "dog")),
     "class 'dog' has 1 image(s); carving val/ out of train/ needs at least 2"),
    ("no class folders", only_images_at_root, "holds no class folders"),
    ("no folder at all", lambda r: None, "is not a folder"),
]


@pytest.mark.parametrize("case,build,expected", HOSTILE, ids=[c[0] for c in HOSTILE])
def test_hostile_image_folder_is_refused(tmp_path, case, build, expected):
    root = tmp_path / "tree"
    build(root)
    with pytest.raises(ConfigError) as err:
        load_raw("imagefolder", {"path": str(root), "store_size": 16})
    message = str(err.value)
    assert message.startswith("targets.options.path: ") and expected in message and " -- fix: " in message
    assert "\n" not in message


@pytest.mark.parametrize("limit", [300, 100])  # 20x24 = 480 pixels: over the warning limit, then over 2x (error)
def test_decompression_bomb_is_refused(tmp_path, monkeypatch, limit):
    write_image_folder(tmp_path / "tree", per_class=3)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    with pytest.raises(ConfigError, match="'cat/0.png' is too large to decode safely.*fix: shrink it"):
        load_raw("imagefolder", {"path": str(tmp_path / "tree"), "store_size": 16})


def test_image_folder_skips_hidden_and_other_files_and_reads_subfolders(tmp_path):
    root = tmp_path / "tree"
    write_image_folder(root, per_class=3)
    (root / "cat" / "notes.txt").write_text("skipped")
    (root / "cat" / ".hidden.png").write_text("skipped, though it is no image")
    mkdir(root / ".cache")  # a hidden folder is no class
    (mkdir(root / "dog" / "more") / "extra.PNG").write_bytes(png_bytes())  # subfolders and upper-case extensions
    raw = load_raw("imagefolder", {"path": str(root), "store_size": 16})
    assert raw.classes == ["cat", "dog", "fox"]
    assert sum(len(raw.splits[s][1]) for s in ("train", "val", "test")) == 10


def test_hostile_image_folder_is_refused_by_the_cli_before_anything_is_written(tmp_path, capsys):
    from test_bad_input import GOOD, snapshot

    from transferbench.cli import main

    tree = tmp_path / "tree"
    write_image_folder(tree, per_class=4)
    os.symlink(tree, tree / "cat" / "loop")
    study = tmp_path / "study.yaml"
    study.write_text(GOOD.replace("{dataset: textures}", f"{{dataset: imagefolder, options: {{path: '{tree}'}}}}"))
    results = tmp_path / "results"
    results.mkdir()
    assert main(["study", str(study), "--results", str(results), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[0].startswith("error: targets.0.options.path: 'cat/loop' is a symbolic link -- fix: ")
    assert snapshot(results) == {}


def test_folder_fingerprint_follows_what_the_reader_reads(tmp_path):
    from transferbench.data.external import folder_fingerprint

    root = tmp_path / "tree"
    write_image_folder(root, per_class=3)
    first = folder_fingerprint(root)
    assert folder_fingerprint(root) == first  # an untouched re-walk
    os.symlink(root, tmp_path / "alias")
    assert folder_fingerprint(tmp_path / "alias") == first  # the root itself may be a link; nothing below it
    (root / "cat" / "notes.txt").write_text("not an image: not read, not in the key")
    assert folder_fingerprint(root) == first
    (root / "cat" / "new.png").write_bytes(png_bytes())
    added = folder_fingerprint(root)
    assert added != first
    (root / "cat" / "new.png").unlink()
    assert folder_fingerprint(root) == first
    (root / "dog" / "0.png").unlink()
    assert folder_fingerprint(root) not in (first, added)
    removed = folder_fingerprint(root)
    (root / "fox" / "0.png").write_bytes(png_bytes(seed=7) + b"\0")  # rewritten, another size
    assert folder_fingerprint(root) != removed
