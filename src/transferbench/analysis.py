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


# ---------------------------------------------------------------- when transfer fails ---------------------

# Measures in domains.csv and the sign they should have against the realized gain: distances grow as
# transfer gets harder (-1), transferability estimates grow as it gets easier (+1).
MEASURES = {"fd": -1, "mmd": -1, "pad": -1, "bn_kl_mean": -1, "logme": 1, "leep": 1, "nce": 1, "h_score": 1,
            "knn_acc": 1}


def negative_transfer(gains_df: pd.DataFrame) -> pd.DataFrame:
    """Negative transfer gap (Wang et al. 2019): error with transfer minus error from scratch, i.e.
    -gain, with its paired CI; `negative` only when the whole CI lies on the harmful side (> 0)."""
    out = gains_df.copy()
    out["ntg"], out["ntg_ci_low"], out["ntg_ci_high"] = -out["gain"], -out["ci_high"], -out["ci_low"]
    out["negative"] = out["ntg_ci_low"] > 0
    return out


def best_depth(selected: pd.DataFrame) -> pd.DataFrame:
    """Per (backbone, target, size): the frozen depth with the best validation accuracy."""
    keys = ["backbone", "weights", "target", "n_per_class"]
    best = selected.loc[selected.groupby(keys, dropna=False)["transfer_val_mean"].idxmax()]
    return best[keys + ["frozen_depth", "frozen_groups", "frozen_fraction", "schedule", "transfer_mean", "gain",
                        "ci_low", "ci_high"]].reset_index(drop=True)


def kendall_tau_b(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Kendall's tau-b of paired samples, batched over leading axes: x, y [..., n] -> [...].
    tau_b = sum sign(dx) sign(dy) / sqrt(sum sign(dx)^2 * sum sign(dy)^2) over pairs; nan if constant."""
    sx = np.sign(x[..., :, None] - x[..., None, :])
    sy = np.sign(y[..., :, None] - y[..., None, :])
    num = (sx * sy).sum((-1, -2))
    den = np.sqrt((sx * sx).sum((-1, -2)) * (sy * sy).sum((-1, -2)))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


def kendall_tau_ci(x: np.ndarray, y: np.ndarray, n_boot: int = 1000, confidence: float = 0.95,
                   seed: int = 0) -> tuple[float, float, float]:
    """Kendall tau-b with a percentile bootstrap CI over the paired points."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if len(x) < 3:
        return float("nan"), float("nan"), float("nan")
    idx = np.random.default_rng(seed).integers(0, len(x), (n_boot, len(x)))
    boots = kendall_tau_b(x[idx], y[idx])
    alpha = (1 - confidence) / 2
    lo, hi = np.nanquantile(boots, [alpha, 1 - alpha]) if np.isfinite(boots).any() else (np.nan, np.nan)
    return float(kendall_tau_b(x, y)), float(lo), float(hi)


def correlations(domains: pd.DataFrame, selected: pd.DataFrame, n_boot: int = 1000,
                 confidence: float = 0.95) -> pd.DataFrame:
    """Kendall tau between each measure and the realized gain / transfer accuracy, across
    (backbone, target) points, per frozen depth and size."""
    if domains.empty or selected.empty:
        return pd.DataFrame()
    m = selected.merge(domains, on=["backbone", "weights", "target"])
    rows = []
    for (depth, n), g in m.groupby(["frozen_depth", "n_per_class"]):
        for measure, sign in MEASURES.items():
            if measure not in g or g[measure].isna().all():
                continue
            for outcome, column in (("gain", "gain"), ("transfer_acc", "transfer_mean")):
                tau, lo, hi = kendall_tau_ci(g[measure], g[column], n_boot, confidence)
                rows.append(dict(measure=measure, expected_sign=sign, outcome=outcome, frozen_depth=depth,
                                 n_per_class=n, n_points=len(g), tau=tau, ci_low=lo, ci_high=hi, agreement=sign * tau))
    return pd.DataFrame(rows)


def measure_ranking(corr: pd.DataFrame) -> pd.DataFrame:
    """Measures ordered by mean sign-adjusted tau with the realized gain (1 = ranks targets perfectly)."""
    if corr.empty:
        return corr
    g = corr[corr["outcome"] == "gain"].groupby("measure")
    return g.agg(mean_agreement=("agreement", "mean"), mean_tau=("tau", "mean"), cells=("tau", "size")).sort_values(
        "mean_agreement", ascending=False).reset_index()
