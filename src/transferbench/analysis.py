"""runs.csv -> gains.csv: each transfer grid point against its matched scratch cells.

Pairing is by seed (same k-shot subset, same data order): the gain of one seed is transfer
test accuracy minus scratch test accuracy; the grid point's gain is the mean over seeds with a
percentile bootstrap CI over seeds. Negative transfer is called only when the whole CI is below 0.
Model selection follows DomainBed: the schedule is chosen on the validation split.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

# A transfer grid point, without the seed.
POINT = ["backbone", "weights", "target", "frozen_depth", "frozen_groups", "frozen_fraction", "n_per_class", "schedule"]
# What a scratch cell shares with the transfer cells it is matched to.
MATCH = ["backbone", "target", "n_per_class", "schedule", "seed"]


def depth_label(frozen_depth, arm: str = "transfer") -> str:
    if arm == "scratch":
        return "scratch"
    return "probe (all)" if str(frozen_depth) == "all" else f"frozen {frozen_depth}"


def bootstrap_ci(values: np.ndarray, n_boot: int, confidence: float, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean; (nan, nan) with fewer than 2 values."""
    values = np.asarray(values, dtype=float)
    if len(values) < 2:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = rng.choice(values, size=(n_boot, len(values)), replace=True).mean(axis=1)
    alpha = (1 - confidence) / 2
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


def verdict(lo: float, hi: float) -> str:
    if lo > 0:
        return "positive"
    if hi < 0:
        return "negative"
    return "inconclusive"


def ok_runs(runs: pd.DataFrame) -> pd.DataFrame:
    runs = runs[runs["status"] == "ok"].copy()
    runs["frozen_depth"] = runs["frozen_depth"].astype(str)
    return runs


def paired(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per transfer cell with its matched scratch cell's accuracy (same seed)."""
    runs = ok_runs(runs)
    scratch = runs[runs["arm"] == "scratch"][MATCH + ["test_acc", "val_acc"]].rename(
        columns={"test_acc": "scratch_test_acc", "val_acc": "scratch_val_acc"})
    m = runs[runs["arm"] == "transfer"].merge(scratch, on=MATCH, how="inner")
    m["gain"] = m["test_acc"] - m["scratch_test_acc"]
    return m


def gains(runs: pd.DataFrame, n_boot: int = 2000, confidence: float = 0.95) -> pd.DataFrame:
    m = paired(runs)
    rows = []
    for key, g in m.groupby(POINT, sort=True, dropna=False):
        lo, hi = bootstrap_ci(g["gain"].to_numpy(), n_boot, confidence)
        rows.append(dict(zip(POINT, key), transfer_mean=g["test_acc"].mean(), scratch_mean=g["scratch_test_acc"].mean(),
                         transfer_val_mean=g["val_acc"].mean(), scratch_val_mean=g["scratch_val_acc"].mean(),
                         gain=g["gain"].mean(), ci_low=lo, ci_high=hi, n_seeds=len(g), verdict=verdict(lo, hi)))
    cols = POINT + ["transfer_mean", "scratch_mean", "transfer_val_mean", "scratch_val_mean", "gain", "ci_low",
                    "ci_high", "n_seeds", "verdict"]
    return pd.DataFrame(rows, columns=cols)


def select_on_val(gains_df: pd.DataFrame) -> pd.DataFrame:
    """Per (backbone, target, depth, size): the schedule with the best mean transfer validation
    accuracy; the scratch cells it is compared with ran the same schedule."""
    if gains_df.empty:
        return gains_df
    keys = ["backbone", "weights", "target", "frozen_depth", "n_per_class"]
    best = gains_df.loc[gains_df.groupby(keys, dropna=False)["transfer_val_mean"].idxmax()].copy()
    best["selected_on"] = "val"
    return best.reset_index(drop=True)


def select_oracle(gains_df: pd.DataFrame) -> pd.DataFrame:
    """The same choice made on test accuracy: reported beside the val choice, never instead."""
    keys = ["backbone", "weights", "target", "frozen_depth", "n_per_class"]
    best = gains_df.loc[gains_df.groupby(keys, dropna=False)["transfer_mean"].idxmax()].copy()
    best["selected_on"] = "test (oracle)"
    return best.reset_index(drop=True)
