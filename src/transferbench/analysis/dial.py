"""The domain dial: how a transfer gain falls as the target moves away from the source, and where it reaches zero.

For each backbone x tuning x size, each condition's gain (raw, relative error reduction, over the strongest baseline
without pretraining) is set against its measured distance from the source, and a line is fitted to the conditions.
The **break-even distance** is where the line reaches zero gain; where the gain's lower confidence band first
reaches zero is how far transfer **pays reliably**. Intervals come from resampling *base datasets* (textures,
digits, ...), not conditions: the dial levels of one dataset share its images and are not independent (a
delete-one-dataset jackknife, whose coverage held in simulation where a percentile bootstrap's did not).
Either is "not reached within the dial" when it lies beyond the conditions measured, and the report says so with
the dial's range.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from transferbench.analysis.gains import jackknife

OUTCOMES = {"gain": "gain over scratch", "rer": "relative error reduction",
            "gain_vs_baseline": "gain over the strongest baseline without pretraining"}
GROUP = ["backbone", "weights", "tuning", "n_per_class"]
GRID_POINTS = 41  # distances at which the band is drawn, across the dial
MIN_DATASETS = 3  # fewer base datasets leave no interval worth the name


def fit_line(d: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(intercept, slope) of least squares; nan where the distances do not vary."""
    if len(d) < 2 or np.ptp(d) == 0:
        return np.nan, np.nan
    slope, intercept = np.polyfit(d, y, 1)
    return float(intercept), float(slope)


def zero_crossing(intercept: float, slope: float) -> float:
    """Where the line reaches zero gain: +inf when it never falls to zero (slope >= 0 from a positive start), -inf
    when it is never above zero."""
    if np.isnan(slope):
        return np.nan
    if slope < 0:
        return -intercept / slope
    return np.inf if intercept > 0 else -np.inf


def break_even(d: np.ndarray, y: np.ndarray, datasets: np.ndarray, confidence: float = 0.95) -> dict:
    """The line of gain against distance, its break-even distance and how far the gain pays reliably, with
    intervals over base datasets (jackknife).

    `reached`: the break-even lies within the dial's range of distances. `pays_until`: the first distance of the
    dial where the band's lower end is at or below zero (nan: above zero across the whole dial). The break-even's
    interval is nan when it is not identified: the line does not fall to zero, or stops falling without one of the
    datasets."""
    d, y = np.asarray(d, float), np.asarray(y, float)
    names = np.unique(datasets)
    intercept, slope = fit_line(d, y)
    lo_d, hi_d = float(d.min()), float(d.max())
    grid = np.linspace(lo_d, hi_d, GRID_POINTS)
    lines = np.array([fit_line(d[datasets != n], y[datasets != n]) for n in names])  # each without one dataset
    point = zero_crossing(intercept, slope)
    crossings = np.array([zero_crossing(a, b) for a, b in lines])
    be_low, be_high = jackknife(crossings, point, confidence) if np.isfinite(crossings).all() and \
        np.isfinite(point) else (np.nan, np.nan)
    slope_low, slope_high = jackknife(lines[:, 1], slope, confidence)
    low, high = jackknife(lines[:, :1] + lines[:, 1:] * grid, intercept + slope * grid, confidence)
    at_zero = np.flatnonzero(low <= 0)
    return dict(intercept=intercept, slope=slope, slope_low=float(slope_low), slope_high=float(slope_high),
                break_even=point, be_low=float(be_low), be_high=float(be_high), reached=bool(lo_d <= point <= hi_d),
                d_min=lo_d, d_max=hi_d, pays_until=float(grid[at_zero[0]]) if len(at_zero) else np.nan,
                n_conditions=len(d), n_datasets=len(names), grid=grid, band_low=low, band_high=high)


def dial(gains: pd.DataFrame, domains: pd.DataFrame, distances: list[str],
         confidence: float = 0.95) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(one row per backbone x tuning x size x outcome x distance: the line, break-even and how far transfer pays
    reliably; the band of each, for the figure). Empty where fewer than MIN_DATASETS base datasets were measured."""
    keys = ["backbone", "weights", "target"]
    if gains.empty or domains.empty or "dataset" not in domains:
        return pd.DataFrame(), pd.DataFrame()
    dist = [m for m in distances if m in domains and domains[m].notna().any()]
    m = gains.merge(domains[keys + ["dataset"] + dist], on=keys)
    rows, bands = [], []
    for key, g in m.groupby(GROUP, sort=True, dropna=False):
        if g["dataset"].nunique() < MIN_DATASETS:
            continue
        for outcome in [o for o in OUTCOMES if o in g]:
            for measure in dist:
                ok = g[[outcome, measure]].notna().all(axis=1)
                if g.loc[ok, "dataset"].nunique() < MIN_DATASETS:
                    continue
                r = break_even(g.loc[ok, measure].to_numpy(), g.loc[ok, outcome].to_numpy(),
                               g.loc[ok, "dataset"].to_numpy(), confidence)
                head = dict(zip(GROUP, key)) | dict(outcome=outcome, distance=measure)
                rows.append(head | {k: v for k, v in r.items() if k not in ("grid", "band_low", "band_high")})
                bands += [head | dict(d=d, fit=r["intercept"] + r["slope"] * d, low=lo, high=hi)
                          for d, lo, hi in zip(r["grid"], r["band_low"], r["band_high"])]
    return pd.DataFrame(rows), pd.DataFrame(bands)


def widest(lines: pd.DataFrame, distance: str = "fd", outcome: str = "gain") -> pd.DataFrame:
    """The lines of one distance and outcome measured over the most base datasets (the dial's own arms, in a
    fractional design), full fine-tuning first: what the figure and the summary show."""
    if lines.empty:
        return lines
    lines = lines[(lines["distance"] == distance) & (lines["outcome"] == outcome)]
    lines = lines[lines["n_datasets"] == lines["n_datasets"].max()] if len(lines) else lines
    return lines.assign(full=lines["tuning"] != "frozen 0").sort_values(["full", "backbone", "tuning",
                                                                          "n_per_class"]).drop(columns="full")
