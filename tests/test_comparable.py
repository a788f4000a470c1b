"""Gains comparable across targets (analysis/comparable.py), on synthetic curves whose answers are known."""

import math

import numpy as np
import pandas as pd
import pytest

from transferbench.analysis.comparable import comparable, examples_to_reach

SIZES = np.array([2, 4, 8, 16, 32])


def curve(n):
    """A scratch learning curve linear in log size: 0.3 at 2 per class, +0.1 per doubling (0.7 at 32)."""
    return 0.3 + 0.1 * np.log2(np.asarray(n) / 2)


@pytest.mark.parametrize("accuracy,expected", [(0.45, 2 * 2 ** 1.5), (0.6, 16.0), (0.7, 32.0)])
def test_examples_to_reach_reads_the_curve_in_log_size(accuracy, expected):
    n, bound = examples_to_reach(SIZES, curve(SIZES), accuracy)
    assert n == pytest.approx(expected) and bound == ""


def test_beyond_the_curve_is_a_bound():
    assert examples_to_reach(SIZES, curve(SIZES), 0.9) == (32.0, ">=")  # scratch never gets there in the curve
    assert examples_to_reach(SIZES, curve(SIZES), 0.2) == (2.0, "<=")  # scratch is better even at 2 per class


def test_a_noisy_curve_is_made_monotone_first():
    """A dip at 8 (0.42 < 0.4's neighbours' trend) is pooled with its neighbour: the first size reaching 0.5 is
    still read between 8 and 16, never before a smaller size that fell below."""
    acc = np.array([0.30, 0.45, 0.41, 0.60, 0.70])
    n, bound = examples_to_reach(SIZES, acc, 0.5)
    assert bound == "" and 8 < n < 16  # pooled 4 and 8 at 0.43, then linear in log size to 0.60 at 16


def runs_table(transfer_acc: dict[int, list[float]], scratch_acc: dict[int, list[float]],
               pixel_acc: dict[int, list[float]] | None = None) -> pd.DataFrame:
    """Records of one backbone and target: transfer (frozen 0) at some sizes, scratch at its curve's sizes and a
    pixel baseline, each as test accuracy per seed (validation accuracy equal to it)."""
    rows = []
    common = dict(backbone="m", weights="imagenet", target="t", dataset="t", shift=None, severity=0, status="ok",
                  schedule="cosine", lr=1e-3, frozen_groups=0, frozen_fraction=0.0, train_groups=None, n_test=1000)
    for arm, table in (("transfer", transfer_acc), ("scratch", scratch_acc), ("pixels", pixel_acc or {})):
        for n, accs in table.items():
            for seed, acc in enumerate(accs):
                rows.append(common | dict(arm=arm, frozen_depth=0, n_per_class=n, seed=seed, test_acc=acc,
                                          val_acc=acc, **({"backbone": "logistic_pixels", "weights": "none",
                                                           "schedule": "none"} if arm == "pixels" else {})))
    return pd.DataFrame(rows)


def test_effective_data_and_error_reduction_on_known_curves():
    """Transfer at 4 per class reaches scratch's accuracy at 16 (0.6): 4x the data, 12 examples per class saved;
    against scratch at 4 (0.4) its error falls from 0.6 to 0.4, a third."""
    scratch = {n: [curve(n) + d for d in (-0.01, 0.0, 0.01)] for n in SIZES}
    transfer = {4: [0.61, 0.6, 0.59]}  # seeds that vary against their own curves: an interval of some width
    row = comparable(runs_table(transfer, scratch)).iloc[0]
    assert row["eff_multiplier"] == pytest.approx(4.0, rel=0.02) and row["eff_bound"] == ""
    assert row["eff_low"] < 4.0 < row["eff_high"] and row["eff_data"] == pytest.approx(12, rel=0.05)
    assert row["rer"] == pytest.approx(1 - 0.4 / 0.6, abs=0.01)
    assert row["baseline"] == "scratch" and row["gain_vs_baseline"] == pytest.approx(0.2)


def test_transfer_beyond_scratch_s_largest_size_is_a_lower_bound():
    scratch = {n: [curve(n) + d for d in (-0.01, 0.0, 0.01)] for n in SIZES}
    row = comparable(runs_table({2: [0.9, 0.91, 0.92]}, scratch)).iloc[0]
    assert row["eff_bound"] == ">=" and row["eff_multiplier"] == pytest.approx(16.0)
    assert row["eff_high"] == math.inf and row["eff_low"] <= 16.0


def test_the_strongest_baseline_is_chosen_on_validation():
    """A pixel baseline at 0.55 beats scratch at 4 per class (0.4): the gain is measured against it."""
    scratch = {n: [curve(n)] * 3 for n in SIZES}
    row = comparable(runs_table({4: [0.6, 0.62, 0.64]}, scratch, {4: [0.55, 0.55, 0.55]})).iloc[0]
    assert row["baseline"] == "logistic_pixels" and row["gain_vs_baseline"] == pytest.approx(0.07)


def test_the_effective_data_interval_has_its_coverage():
    """Seeds whose scratch curves and transfer accuracies carry noise (sd 0.02): the 90% interval of the multiplier
    covers the true 4x in 90% +- 4% of 400 simulated points (the estimator is a smooth function of the seed's
    accuracies, so the t-interval of its log holds)."""
    rng = np.random.default_rng(0)
    covered, trials = 0, 400
    for _ in range(trials):
        scratch = {n: list(curve(n) + rng.normal(0, 0.02, 5)) for n in SIZES}
        transfer = {4: list(0.6 + rng.normal(0, 0.02, 5))}
        row = comparable(runs_table(transfer, scratch), confidence=0.9).iloc[0]
        covered += row["eff_low"] <= 4.0 <= row["eff_high"]
    assert abs(covered / trials - 0.9) <= 0.04, covered / trials
