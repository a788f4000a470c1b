"""Real data on disk, read through torchvision's own classes from files written in their formats,
and sources pretrained here: all offline."""

import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from transferbench.data import load_target
from transferbench.data.embedded import load_raw
from transferbench.errors import ConfigError


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
    import torchvision.datasets as tvd

    write_cifar10(tmp_path)
    import torchvision.datasets.cifar as cifar

    monkeypatch.setattr(cifar, "check_integrity", lambda *a, **k: True)  # our files do not have the real md5s
    raw = load_raw("cifar10", {"root": str(tmp_path), "store_size": 32})
    assert raw.classes == [f"class{i}" for i in range(10)]
    assert len(raw.splits["test"][0]) == 20 and raw.splits["train"][0].shape[1:] == (32, 32, 3)
    assert len(raw.splits["train"][0]) + len(raw.splits["val"][0]) == 50  # val carved from train
    t = load_target("cifar10", None, 0, 16, {"root": str(tmp_path), "store_size": 32})
    assert t.x["train"].shape[1:] == (3, 16, 16)


def write_image_folder(root, classes=("cat", "dog", "fox"), per_class=10):
    rng = np.random.default_rng(0)
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
    write_image_folder(tmp_path / "d" / "test", per_class=3)
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
    from transferbench.backbones import create_backbone
    from transferbench.source import ensure_checkpoints, weights_map
    from transferbench.study import load_study

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
