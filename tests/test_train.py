import math

import pytest

from transferbench.features import FeatureCache
from transferbench.runner import run_one
from transferbench.store import read_records
from transferbench.study import Cell
from transferbench.train import train_cell

BASE = dict(arm="transfer", model="tf_efficientnet_lite0", weights="imagenet", dataset="textures", shift=None,
            severity=0, frozen_depth="all", n_per_class=2, schedule="cosine", lr=1e-3, seed=0, epochs=2,
            batch_size=16, image_size=32, optimizer="adamw", weight_decay=0.0, augment=False, device="cpu",
            amp=False, channels_last=True)


def cell(**kw):
    return Cell(**(BASE | kw))


def test_one_cell_trains_and_reports(torch_single_thread):
    r = train_cell(cell(frozen_depth=5, epochs=3), FeatureCache())
    assert r["n_train"] == 20 and r["frozen_groups"] == 5 and 0 < r["frozen_fraction"] < 1
    assert 0 <= r["test_acc"] <= 1 and math.isfinite(r["test_loss"])
    assert [p["epoch"] for p in r["curves"] if p["metric"] == "acc"] == [1, 2, 3]
    assert r["images_seen"] == 3 * 20 and r["device_used"] == "cpu"


def test_scratch_is_the_same_loop_with_no_weights_and_nothing_frozen(torch_single_thread):
    r = train_cell(cell(arm="scratch", weights="none", frozen_depth=0), FeatureCache())
    assert r["frozen_fraction"] == 0 and r["weights_id"] == "none:seed0"


def test_cells_sharing_a_prefix_share_its_features(torch_single_thread, tmp_path):
    cache = FeatureCache(tmp_path)
    first = train_cell(cell(seed=0), cache)
    second = train_cell(cell(seed=1, n_per_class=4, schedule="constant"), cache)
    assert first["cache"] == "miss" and second["cache"] == "memory" and second["prefix_seconds"] == 0
    third = train_cell(cell(seed=2), FeatureCache(tmp_path))  # another process: from disk
    assert third["cache"] == "disk"


def test_augmented_cells_with_frozen_layers_pay_full_price(torch_single_thread):
    r = train_cell(cell(frozen_depth=3, augment=True, epochs=1), FeatureCache())
    assert r["cache"] == "off"


def test_same_cell_gives_identical_numbers(torch_single_thread):
    a = train_cell(cell(frozen_depth=0, epochs=2), FeatureCache())
    b = train_cell(cell(frozen_depth=0, epochs=2), FeatureCache())
    assert a["test_acc"] == b["test_acc"] and a["test_loss"] == b["test_loss"]
    assert [p["value"] for p in a["curves"]] == [p["value"] for p in b["curves"]]


def test_a_diverging_cell_is_recorded_as_failed(tmp_path, torch_single_thread):
    bad = cell(optimizer="sgd", lr=1e12, frozen_depth="all", epochs=3)
    summary = run_one(bad, "t", str(tmp_path), 1, {})
    assert summary["status"] == "failed" and "Diverged" in summary["error"]
    assert read_records(tmp_path)[bad.cell_id]["status"] == "failed"


def test_eval_epochs_every_or_log_spaced():
    from transferbench.train import eval_epochs

    assert eval_epochs(10, "log") == {1, 2, 4, 8, 10}
    assert eval_epochs(8, "log") == {1, 2, 4, 8}
    assert eval_epochs(3, "epoch") == {1, 2, 3}
