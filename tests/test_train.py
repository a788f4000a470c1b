import math

import numpy as np
import pytest
import torch

from transferbench.core.study import Cell
from transferbench.models.features import FeatureCache
from transferbench.sweep.runner import run_one
from transferbench.sweep.store import read_records
from transferbench.training.cell import train_cell

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
    summary = run_one(bad, None, "t", str(tmp_path), 1, {})
    assert summary["status"] == "failed" and "Diverged" in summary["error"]
    assert read_records(tmp_path)[bad.cell_id]["status"] == "failed"


def test_eval_epochs_every_or_log_spaced():
    from transferbench.training.loop import eval_epochs

    assert eval_epochs(10, "log") == {1, 2, 4, 8, 10}
    assert eval_epochs(8, "log") == {1, 2, 4, 8}
    assert eval_epochs(3, "epoch") == {1, 2, 3}


# ------------------------------------------------------------------- the fair protocol -----------------

def synthetic(n_train=60, d=16, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, d, generator=g) * 1.5
    def split(n):
        y = torch.arange(n) % classes
        return centers[y] + torch.randn(n, d, generator=g), y
    (xt, yt), (xv, yv), (xs, ys) = split(n_train), split(90), split(90)
    return {"train": xt, "val": xv, "test": xs}, {"train": yt, "val": yv, "test": ys}


PROTOCOL = dict(steps=200, eval_every=10, patience=3, min_steps=20, precise_bn=True, keep_best=True)


def test_early_stopping_fires_and_the_best_validation_weights_are_tested():
    from torch import nn

    from transferbench.training.cell import train_loop

    feats, ys = synthetic()
    c = cell(frozen_depth=0, lr=0.3, optimizer="sgd", batch_size=8, **PROTOCOL)
    torch.manual_seed(0)
    r = train_loop(c, nn.Sequential(nn.Linear(16, 3)), feats, ys, torch.arange(60), torch.device("cpu"), 3)
    vals = [p["value"] for p in r["curves"] if p["split"] == "val" and p["metric"] == "acc"]
    assert r["val_acc"] == pytest.approx(max(vals))  # the best validation weights are the ones evaluated
    assert r["early_stopped"] and r["steps_taken"] < 200
    assert r["steps_taken"] - r["best_step"] >= 3 * 10 and r["converged"]


@pytest.mark.parametrize("chunk", [50, 10])
def test_precise_bn_gives_the_exact_statistics_of_the_training_set(chunk, monkeypatch):
    """In one pass, and as the cumulative average over chunks (the mean exactly; the variance is then the average of
    the chunks' own variances)."""
    from torch import nn

    from transferbench.training import loop
    from transferbench.training.loop import precise_bn

    monkeypatch.setattr(loop, "PRECISE_BN_CHUNK", chunk)
    x = torch.randn(50, 4) * 3 + 1
    bn = nn.BatchNorm1d(4)
    precise_bn(nn.Sequential(bn), x, channels_last=False)
    assert torch.allclose(bn.running_mean, x.mean(0), atol=1e-5)
    variance = x.var(0) if chunk == 50 else torch.stack([c.var(0) for c in x.split(chunk)]).mean(0)
    assert torch.allclose(bn.running_var, variance, atol=1e-4)  # BatchNorm keeps the unbiased variance
    assert bn.momentum == 0.1  # restored


def test_lr_candidates_race_and_the_best_on_validation_goes_on():
    from torch import nn

    from transferbench.training.cell import train_loop

    feats, ys = synthetic()

    def fit(**kw):
        torch.manual_seed(0)
        c = cell(frozen_depth=0, optimizer="sgd", batch_size=8, **PROTOCOL, **kw)
        return train_loop(c, nn.Sequential(nn.Linear(16, 3)), feats, ys, torch.arange(60), torch.device("cpu"), 3)

    race = fit(lr=0.0, lrs=[1e-4, 0.1])
    assert set(race["lr_rung"]) == {1e-4, 0.1} and race["lr_chosen"] == max(race["lr_rung"], key=race["lr_rung"].get)
    alone = fit(lr=race["lr_chosen"])  # the winner's trajectory is exactly a single run at its LR
    assert race["test_acc"] == alone["test_acc"] and race["steps_taken"] == alone["steps_taken"]
    assert race["images_seen"] == alone["images_seen"] + 5 * 60  # plus the loser's rung: 40 steps, 5 epochs of 60


def test_the_lbfgs_probe_is_the_full_logistic_regression_optimum():
    """Fitted in the span of the training examples (n < d), it matches scikit-learn on all d dimensions."""
    from sklearn.linear_model import LogisticRegression

    from transferbench.training.baselines import fit_logistic

    r = np.random.default_rng(0)
    y = {s: np.arange(n) % 3 for s, n in (("train", 30), ("val", 60), ("test", 60))}
    x = {s: r.normal(size=(len(v), 100)) + np.eye(100)[v] * 2 for s, v in y.items()}
    w, b, fields = fit_logistic(x, y, np.arange(30))
    mean, scale = x["train"].mean(0), x["train"].std(0)
    full = LogisticRegression(C=fields["l2_C"], max_iter=5000, tol=1e-10).fit((x["train"] - mean) / scale, y["train"])
    logits = x["test"] @ w.T + b
    ours = np.exp(logits - logits.max(1, keepdims=True))
    ours /= ours.sum(1, keepdims=True)
    assert np.allclose(ours, full.predict_proba((x["test"] - mean) / scale), atol=1e-4)
    assert fields["converged"] and fields["test_acc"] == pytest.approx((ours.argmax(1) == y["test"]).mean())


def test_pixel_nearest_centroid_on_digits_matches_the_known_figure(torch_single_thread):
    r = train_cell(cell(arm="pixels", model="nearest_centroid", weights="none", frozen_depth=0, dataset="digits",
                        n_per_class=8), FeatureCache())
    assert 0.84 <= r["test_acc"] <= 0.92 and r["converged"]  # design notes: 88% at 8 per class


def test_first_seed_lr_choice_is_reused_by_the_other_seeds(tmp_path, torch_single_thread):
    from transferbench.core.study import expand, load_study, study_path
    from transferbench.sweep.runner import run_cells

    study = load_study(study_path("smoke"), [
        "backbones=[{model: tf_efficientnet_lite0}]", "targets=[{dataset: digits}]", "grid.frozen_depth=[0]",
        "grid.n_per_class=[2]", "grid.schedule=[{name: constant}]", "grid.seed=[0,1,2]", "scratch.enabled=false",
        "baselines.methods=[]", "train.steps=12", "train.eval_every=3", "train.min_steps=6",
        "train.lrs=[0.0001,0.01]", "train.lr_search=first_seed"], None)
    cells = expand(study)
    assert [c.lr_from_seed for c in sorted(cells, key=lambda c: c.seed)] == [None, 0, 0]
    run_cells(study, cells, tmp_path, jobs=1, backend="sequential", progress=False)
    records = sorted(read_records(tmp_path).values(), key=lambda r: r["seed"])
    first, *others = records
    assert first["lr_rung"] and first["lr_source"] is None  # the first seed raced its candidates
    for r in others:
        assert r["lr_chosen"] == first["lr_chosen"] and r["lr_rung"] is None and r["lr_source"] == first["cell_id"]
        assert r["images_seen"] <= 12 * 20  # one run, no losing candidate's steps
