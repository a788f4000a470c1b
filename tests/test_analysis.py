import numpy as np
import pandas as pd
import pytest

from transferbench.analysis import bootstrap_ci, gains, select_on_val, select_oracle


def runs(transfer_acc, scratch_acc, target="t", depth="0", schedule="cosine", val_shift=0.0):
    rows = []
    for seed, (a, b) in enumerate(zip(transfer_acc, scratch_acc)):
        common = dict(backbone="m", target=target, n_per_class=5, schedule=schedule, seed=seed, status="ok")
        rows.append(common | dict(arm="transfer", weights="imagenet", frozen_depth=depth, frozen_groups=0,
                                  frozen_fraction=0.0, test_acc=a, val_acc=a + val_shift))
        rows.append(common | dict(arm="scratch", weights="none", frozen_depth=0, frozen_groups=0,
                                  frozen_fraction=0.0, test_acc=b, val_acc=b))
    return pd.DataFrame(rows)


def test_paired_gain_and_verdicts():
    pos = gains(runs([0.8, 0.7, 0.75], [0.5, 0.45, 0.5]))
    assert pos.loc[0, "gain"] == pytest.approx(0.2667, abs=1e-3) and pos.loc[0, "verdict"] == "positive"
    assert pos.loc[0, "ci_low"] <= pos.loc[0, "gain"] <= pos.loc[0, "ci_high"]
    neg = gains(runs([0.3, 0.35, 0.3], [0.5, 0.45, 0.5]))
    assert neg.loc[0, "verdict"] == "negative" and neg.loc[0, "ci_high"] < 0
    mixed = gains(runs([0.6, 0.4, 0.5], [0.5, 0.5, 0.5]))
    assert mixed.loc[0, "verdict"] == "inconclusive"


def test_single_seed_is_never_a_verdict():
    g = gains(runs([0.9], [0.1]))
    assert g.loc[0, "n_seeds"] == 1 and g.loc[0, "verdict"] == "inconclusive"


def test_bootstrap_ci_of_known_samples():
    lo, hi = bootstrap_ci(np.array([1.0, 1.0, 1.0]), 500, 0.95)
    assert lo == hi == 1.0
    lo, hi = bootstrap_ci(np.arange(100.0), 2000, 0.95)
    assert lo == pytest.approx(49.5 - 1.96 * 2.9, abs=1.0) and hi == pytest.approx(49.5 + 1.96 * 2.9, abs=1.0)


def test_failed_cells_and_unmatched_transfer_cells_do_not_count():
    df = runs([0.8, 0.7], [0.5, 0.5])
    df.loc[1, "status"] = "failed"  # scratch seed 0
    g = gains(df)
    assert g.loc[0, "n_seeds"] == 1


def test_schedule_is_selected_on_val_and_the_oracle_on_test():
    a = runs([0.6, 0.6, 0.6], [0.5] * 3, schedule="constant", val_shift=0.3)  # best on val
    b = runs([0.7, 0.7, 0.7], [0.5] * 3, schedule="cosine")  # best on test
    g = gains(pd.concat([a, b]))
    assert select_on_val(g).loc[0, "schedule"] == "constant"
    assert select_oracle(g).loc[0, "schedule"] == "cosine"


def test_kendall_tau_b_matches_scipy_with_ties():
    from scipy.stats import kendalltau

    from transferbench.analysis import kendall_tau_b, kendall_tau_ci

    r = np.random.default_rng(0)
    for _ in range(20):
        x, y = r.integers(0, 5, 12).astype(float), r.integers(0, 5, 12).astype(float)
        assert kendall_tau_b(x, y) == pytest.approx(kendalltau(x, y).statistic)
    tau, lo, hi = kendall_tau_ci(np.arange(10.0), np.arange(10.0) ** 2)
    assert tau == 1.0 and lo <= tau <= hi
