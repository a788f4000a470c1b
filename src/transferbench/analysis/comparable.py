"""Gains comparable across targets.

A raw accuracy gain is confounded with how easy a target is from scratch: a target scratch learns well leaves
little to gain, however far it is from the source. Each transfer grid point therefore also gets three measures that
correct for it, each per seed (the same k-shot subsets in every arm) with a Student-t interval over seeds:

- relative error reduction, 1 - err_transfer / err_scratch;
- the gain over the strongest baseline without pretraining: the better of scratch and each pixel baseline, chosen
  on validation (mean over seeds) at each point, so "transfer beats what needs no pretraining" is one number;
- the effective data transferred (Hernandez et al. 2021, *Scaling Laws for Transfer*): the examples per class
  scratch would need to reach transfer's accuracy, read off scratch's learning curve over sizes (a monotone fit in
  log size, per seed), as a multiplier of the examples transfer used. Beyond the largest size scratch trained at it
  is a lower bound (">="), below the smallest an upper bound ("<="), and said so.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from sklearn.isotonic import IsotonicRegression

from transferbench.analysis.gains import POINT, SCRATCH_POINT, bh_q, choose, ok_runs, paired, t_interval, verdict

CURVE = [c for c in SCRATCH_POINT if c != "n_per_class"] + ["seed"]  # one learning curve per backbone, target, seed
COMPARABLE_COLUMNS = ["rer", "rer_low", "rer_high", "baseline", "gain_vs_baseline", "gvb_low", "gvb_high", "gvb_q",
                      "gvb_verdict", "eff_multiplier", "eff_low", "eff_high", "eff_bound", "eff_data"]


def examples_to_reach(sizes: np.ndarray, accuracy: np.ndarray, target: float) -> tuple[float, str]:
    """(examples per class at which scratch's learning curve reaches `target`, bound): the curve is the isotonic
    (non-decreasing) fit of accuracy over log size, linear in log size between sizes. Bound '' inside the curve,
    '>=' above its best accuracy (the answer is at least the largest size), '<=' at or below its first fitted
    accuracy (at most the smallest size)."""
    order = np.argsort(sizes)
    logs, acc = np.log(sizes[order].astype(float)), accuracy[order].astype(float)
    fitted = IsotonicRegression(increasing=True).fit_transform(logs, acc)
    if target > fitted[-1]:
        return float(sizes[order][-1]), ">="
    if target <= fitted[0]:
        return float(sizes[order][0]), "<="
    j = int(np.argmax(fitted >= target))  # the first size whose fit reaches the target (j >= 1)
    share = (target - fitted[j - 1]) / (fitted[j] - fitted[j - 1])
    return float(math.exp(logs[j - 1] + share * (logs[j] - logs[j - 1]))), ""


def scratch_curves(runs: pd.DataFrame) -> dict[tuple, tuple[np.ndarray, np.ndarray]]:
    """Per (backbone, target, axes, seed): scratch's sizes and test accuracies, each size at scratch's configuration
    chosen on validation."""
    runs = ok_runs(runs)
    scratch = choose(runs[runs["arm"] == "scratch"], SCRATCH_POINT)
    return {key: (g["n_per_class"].to_numpy(), g["test_acc"].to_numpy())
            for key, g in scratch.groupby(CURVE, sort=True, dropna=False) if g["n_per_class"].nunique() >= 2}


def per_seed(runs: pd.DataFrame) -> pd.DataFrame:
    """Per transfer cell of a point's chosen configuration: its relative error reduction over the matched scratch
    cell, and log2 of its effective-data multiplier with the bound (NaN without a curve of two sizes)."""
    m = paired(runs)
    curves = scratch_curves(runs)
    m["rer"] = 1 - (1 - m["test_acc"]) / (1 - m["scratch_test_acc"]).replace(0, np.nan)
    read = []
    for row in m.itertuples(index=False):
        curve = curves.get(tuple(getattr(row, c) for c in CURVE))
        n, bound = examples_to_reach(*curve, row.test_acc) if curve else (np.nan, "")
        read.append((math.log2(n / row.n_per_class), bound))
    m["eff_log2"], m["eff_bound"] = [v for v, _ in read] or np.nan, [b for _, b in read] or ""
    return m


def effective_data(seeds: pd.DataFrame, n_per_class: int, confidence: float) -> dict:
    """The point's multiplier (geometric mean over seeds) with its interval, from the seeds' log2 multipliers. Where
    some seeds are lower bounds (">="), so are the estimate and its lower end, and the upper end is unknown (inf);
    upper bounds alike; seeds bounded both ways leave no interval."""
    values, bound = seeds["eff_log2"].to_numpy(dtype=float), set(seeds["eff_bound"]) - {""}
    if np.isnan(values).any() or not len(values):
        return dict(eff_multiplier=np.nan, eff_low=np.nan, eff_high=np.nan, eff_bound="", eff_data=np.nan)
    lo, hi, _ = t_interval(values, confidence)
    mult = 2 ** values.mean()
    lo, hi = 2 ** lo, 2 ** hi
    if bound == {">="}:
        hi = math.inf
    elif bound == {"<="}:
        lo = 0.0
    elif bound:
        lo, hi = np.nan, np.nan
    return dict(eff_multiplier=mult, eff_low=lo, eff_high=hi, eff_bound="".join(sorted(bound)),
                eff_data=n_per_class * (mult - 1))  # Hernandez et al.'s D_T: examples per class transfer saved


def strongest_baseline(runs: pd.DataFrame) -> pd.DataFrame:
    """Per (backbone, target, size, axes) and seed: the test accuracy of the strongest method that needs no
    pretraining, chosen on mean validation accuracy over seeds among scratch (at its chosen configuration) and each
    pixel baseline of the same k-shot subsets, with its name."""
    runs = ok_runs(runs)
    scratch = choose(runs[runs["arm"] == "scratch"], SCRATCH_POINT).assign(baseline="scratch")
    pixels = runs[runs["arm"] == "pixels"]
    keys = [c for c in SCRATCH_POINT if c != "backbone"]
    rows = []
    for backbone, model_scratch in scratch.groupby("backbone", sort=True):  # pixels serve every backbone
        both = pd.concat([model_scratch, pixels.assign(baseline=pixels["backbone"], backbone=backbone)])
        rows.append(both[SCRATCH_POINT + ["seed", "baseline", "val_acc", "test_acc"]])
    if not rows:
        return pd.DataFrame(columns=SCRATCH_POINT + ["seed", "baseline", "baseline_test_acc"])
    cand = pd.concat(rows)
    cand[keys] = cand[keys].astype(object)
    mean_val = cand.groupby(SCRATCH_POINT + ["baseline"], dropna=False)["val_acc"].mean().reset_index()
    best = mean_val.sort_values("baseline").loc[lambda d: d.groupby(SCRATCH_POINT, dropna=False)["val_acc"].idxmax()]
    chosen = cand.merge(best[SCRATCH_POINT + ["baseline"]], on=SCRATCH_POINT + ["baseline"])
    return chosen.rename(columns={"test_acc": "baseline_test_acc"})[SCRATCH_POINT + ["seed", "baseline",
                                                                                     "baseline_test_acc"]]


def comparable(runs: pd.DataFrame, confidence: float = 0.95, fdr: float = 0.05,
               min_effect: float = 0.01) -> pd.DataFrame:
    """One row per transfer grid point (POINT): the three comparable measures with their intervals over seeds; the
    gain over the strongest baseline gets BH q-values across the points and a verdict, as the raw gain does."""
    seeds = per_seed(runs)
    if seeds.empty:
        return pd.DataFrame(columns=POINT + COMPARABLE_COLUMNS)
    base = strongest_baseline(runs)
    seeds[SCRATCH_POINT] = seeds[SCRATCH_POINT].astype(object)
    base[SCRATCH_POINT] = base[SCRATCH_POINT].astype(object)
    seeds = seeds.merge(base, on=SCRATCH_POINT + ["seed"], how="left")
    seeds["gvb"] = seeds["test_acc"] - seeds["baseline_test_acc"]
    rows = []
    for key, g in seeds.groupby(POINT, sort=True, dropna=False):
        rer = t_interval(g["rer"].to_numpy(dtype=float), confidence)
        gvb = t_interval(g["gvb"].to_numpy(dtype=float), confidence)
        rows.append(dict(zip(POINT, key)) | dict(
            rer=g["rer"].mean(), rer_low=rer[0], rer_high=rer[1], baseline=g["baseline"].iloc[0],
            gain_vs_baseline=g["gvb"].mean(), gvb_low=gvb[0], gvb_high=gvb[1], gvb_p=gvb[2])
            | effective_data(g, int(key[POINT.index("n_per_class")]), confidence))
    out = pd.DataFrame(rows)
    out["gvb_q"] = bh_q(out["gvb_p"])
    out["gvb_verdict"] = [verdict(v, q, fdr, min_effect) for v, q in zip(out["gain_vs_baseline"], out["gvb_q"])]
    return out[POINT + COMPARABLE_COLUMNS]
