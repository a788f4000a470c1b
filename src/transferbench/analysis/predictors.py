"""Which cheap measure predicts the gain: each label-free distance and transferability estimate (the measures
registry), and a trivial predictor that knows only the examples per class and the number of classes, ranked by
Kendall's tau with the realized gain across target conditions. Targets are the units, and conditions of one base
dataset are not independent: where a study has at least three base datasets, intervals come from a delete-one-dataset
jackknife (as the dial's), else from a bootstrap over targets. A measure is useful only where it beats the trivial
predictor.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd

from transferbench.analysis.gains import jackknife, kendall_tau_b
from transferbench.measures import LABEL_FREE, measures, signs

# Measures in domains.csv and the sign they should have against the realized gain (the measures registry): distances
# grow as transfer gets harder (-1), transferability estimates grow as it gets easier (+1).
SIGNS = signs()

DISTANCES = tuple(measures(*LABEL_FREE))  # label-free: measured on the target's unlabelled images
MIN_TARGETS_TO_RANK = 4  # a Kendall tau over 3 targets takes 4 values; no "best predictor" from so few


def distance_order(conditions: list[str], domains: pd.DataFrame) -> tuple[list[str], str]:
    """Target conditions from near to far as measured (Frechet distance, mean over backbones), else as listed."""
    if domains.empty or "fd" not in domains:
        return conditions, "the study file"
    fd = domains.groupby("target")["fd"].mean()
    return sorted(conditions, key=lambda c: fd.get(c, np.inf)), "measured distance to the source (FD)"


def target_table(domains: pd.DataFrame, selected: pd.DataFrame, estimators: pd.DataFrame | None = None,
                 classes: pd.Series | None = None) -> pd.DataFrame:
    """One row per (target, size): the realized gain and transfer accuracy (mean over backbones and depths, each arm's
    configuration chosen on val) beside each measure (mean over backbones), the target's base dataset and, given
    `classes` (target -> number of classes), the trivial predictor. Targets are the units: backbones that rank the
    same targets are not independent evidence. Estimators come from the k-shot subsets the cells trained on (mean
    over seeds) when `estimators` is given -- the labels a practitioner has -- else from the whole pool."""
    keys = ["backbone", "weights", "target"]
    dist = [m for m in SIGNS if m in DISTANCES and m in domains and domains[m].notna().any()]
    base = ["dataset"] if "dataset" in domains else []
    m = selected.merge(domains[keys + base + dist], on=keys)
    if estimators is not None and len(estimators):
        est = [c for c in SIGNS if c in estimators and c not in DISTANCES]
        kshot = estimators.groupby(keys + ["n_per_class"])[est].mean().reset_index()
        m = m.merge(kshot, on=keys + ["n_per_class"])
    else:
        est = [c for c in SIGNS if c in domains and c not in DISTANCES and domains[c].notna().any()]
        m = m.merge(domains[keys + est], on=keys)
    table = m.groupby(["target", "n_per_class"] + base)[["gain", "transfer_mean"] + dist + est].mean().reset_index()
    if classes is not None and base:
        table["trivial"] = trivial_predictor(table, classes)
    return table


def trivial_predictor(table: pd.DataFrame, classes: pd.Series) -> np.ndarray:
    """The gain predicted from the examples per class and the number of classes alone (least squares on their logs),
    each condition's prediction fitted on the other base datasets' conditions: the bar a measure must clear to be
    called useful. NaN where fewer than two other base datasets are left to fit on."""
    x = np.column_stack([np.ones(len(table)), np.log(table["n_per_class"].to_numpy(float)),
                         np.log(table["target"].map(classes).to_numpy(float))])
    y, datasets = table["gain"].to_numpy(float), table["dataset"].to_numpy()
    out = np.full(len(table), np.nan)
    for d in np.unique(datasets):
        held, rest = datasets == d, datasets != d
        if len(np.unique(datasets[rest])) >= 2:
            coef = np.linalg.lstsq(x[rest], y[rest], rcond=None)[0]
            out[held] = x[held] @ coef
    return out


MIN_DATASETS = 3  # fewer base datasets: the interval resamples targets instead


def correlations(domains: pd.DataFrame, selected: pd.DataFrame, n_boot: int = 1000, confidence: float = 0.95,
                 seed: int = 0, estimators: pd.DataFrame | None = None,
                 classes: pd.Series | None = None) -> pd.DataFrame:
    """Kendall tau between each measure (and the trivial predictor) and the realized gain / transfer accuracy across
    targets, per size. With at least MIN_DATASETS base datasets the interval is a delete-one-dataset jackknife t
    (clipped to [-1, 1]) and loo_min/loo_max range over the taus without one dataset; else a bootstrap over targets
    and the leave-one-target-out range (`resampled` says which)."""
    if domains.empty or selected.empty:
        return pd.DataFrame()
    table, rows = target_table(domains, selected, estimators, classes), []
    candidates = list(SIGNS.items()) + ([("trivial", 1)] if "trivial" in table else [])
    for n, g in table.groupby("n_per_class"):
        k = len(g)
        if k < 3:  # two targets always rank perfectly or perfectly wrong: no evidence
            continue
        datasets = g["dataset"].to_numpy() if "dataset" in g else np.zeros(k)
        by_dataset = len(np.unique(datasets)) >= MIN_DATASETS
        drops = [datasets != d for d in np.unique(datasets)] if by_dataset else \
            [np.arange(k) != i for i in range(k)] if k > 3 else []
        boot = np.random.default_rng(seed).integers(0, k, (n_boot, k))
        for measure, sign in candidates:
            if measure not in g or g[measure].isna().any():
                continue
            x = g[measure].to_numpy(float)
            for outcome, column in (("gain", "gain"), ("transfer_acc", "transfer_mean")):
                y = g[column].to_numpy(float)
                tau = float(kendall_tau_b(x, y))
                without = np.array([float(kendall_tau_b(x[keep], y[keep])) for keep in drops])
                if by_dataset:
                    lo, hi = (float(np.clip(v, -1, 1)) for v in jackknife(without, tau, confidence))
                else:
                    lo, hi = _quantiles(kendall_tau_b(x[boot], y[boot]), confidence)
                ok = without[np.isfinite(without)]
                rows.append(dict(measure=measure, expected_sign=sign, outcome=outcome, n_per_class=n, n_targets=k,
                                 n_datasets=len(np.unique(datasets)), resampled="datasets" if by_dataset else
                                 "targets", tau=tau, ci_low=lo, ci_high=hi,
                                 loo_min=ok.min() if len(ok) else np.nan, loo_max=ok.max() if len(ok) else np.nan,
                                 agreement=sign * tau))
    return pd.DataFrame(rows)


def _quantiles(values: np.ndarray, confidence: float) -> tuple[float, float]:
    ok = values[np.isfinite(values)]
    if not len(ok):
        return float("nan"), float("nan")
    lo, hi = np.quantile(ok, [0.5 - confidence / 2, 0.5 + confidence / 2])
    return float(lo), float(hi)


def measure_ranking(corr: pd.DataFrame) -> pd.DataFrame:
    """Measures ordered by mean sign-adjusted tau with the realized gain over sizes (1 = ranks targets perfectly)."""
    if corr.empty:
        return corr
    g = corr[corr["outcome"] == "gain"].groupby("measure")
    return g.agg(mean_agreement=("agreement", "mean"), mean_tau=("tau", "mean"), sizes=("tau", "size"),
                 targets=("n_targets", "max")).sort_values("mean_agreement", ascending=False).reset_index()


def top_two(domains: pd.DataFrame, selected: pd.DataFrame, ranking: pd.DataFrame, n_boot: int = 1000,
            confidence: float = 0.95, seed: int = 0, estimators: pd.DataFrame | None = None,
            classes: pd.Series | None = None) -> dict | None:
    """The best two measures (the trivial predictor aside) compared on the same resamples, and the best against the
    trivial predictor: the interval of each difference of mean sign-adjusted tau over sizes. `distinguishable` only
    when the first interval excludes 0; `beats_trivial` only when the second lies above 0 (None without a trivial
    predictor)."""
    ranked = [m for m in ranking["measure"] if m != "trivial"]
    if len(ranked) < 2:
        return None
    a, b = ranked[:2]
    table = target_table(domains, selected, estimators, classes)
    first = _difference(table, a, b, n_boot, confidence, seed)
    if first is None:
        return None
    trivial = _difference(table, a, "trivial", n_boot, confidence, seed) if "trivial" in table else None
    return dict(first=a, second=b, difference=first[0], ci_low=first[1], ci_high=first[2],
                distinguishable=bool(first[1] > 0 or first[2] < 0),
                vs_trivial=trivial[0] if trivial else np.nan, trivial_low=trivial[1] if trivial else np.nan,
                trivial_high=trivial[2] if trivial else np.nan,
                beats_trivial=bool(trivial[1] > 0) if trivial else None)


def _signed_tau_gap(g: pd.DataFrame, a: str, b: str, keep) -> float:
    """Sign-adjusted tau(a, gain) - tau(b, gain) on the rows `keep` of one size's table (nan where a tau is)."""
    signs = SIGNS | {"trivial": 1}
    y = g["gain"].to_numpy(float)[keep]
    return float(signs[a] * kendall_tau_b(g[a].to_numpy(float)[keep], y)
                 - signs[b] * kendall_tau_b(g[b].to_numpy(float)[keep], y))


def _difference(table: pd.DataFrame, a: str, b: str, n_boot: int, confidence: float,
                seed: int) -> tuple[float, float, float] | None:
    """Mean over sizes of sign-adjusted tau(a) - tau(b) with the gain, and its interval: a delete-one-dataset
    jackknife (each dataset left out of every size at once) with enough base datasets, else a bootstrap over
    targets (the same resamples for both measures)."""
    sizes = [g for _, g in table.groupby("n_per_class") if len(g) >= 3 and not g[[a, b]].isna().any().any()]
    if not sizes:
        return None
    point = float(np.mean([_signed_tau_gap(g, a, b, np.arange(len(g))) for g in sizes]))
    names: np.ndarray = np.unique(np.concatenate([g["dataset"].to_numpy() for g in sizes])) if "dataset" in table \
        else np.array([])
    with warnings.catch_warnings():  # a resample where a tau is undefined (ties) is dropped, not averaged
        warnings.simplefilter("ignore", RuntimeWarning)
        if len(names) >= MIN_DATASETS:
            without = np.array([np.nanmean([_signed_tau_gap(g, a, b, g["dataset"].to_numpy() != d) for g in sizes])
                                for d in names])
            interval = tuple(map(float, jackknife(without, point, confidence)))
        else:
            rng = np.random.default_rng(seed)
            draws = [[_signed_tau_gap(g, a, b, rng.integers(0, len(g), len(g))) for g in sizes]
                     for _ in range(n_boot)]
            interval = _quantiles(np.nanmean(np.array(draws), axis=1), confidence)
    return point, interval[0], interval[1]
