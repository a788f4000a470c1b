"""runs.csv -> gains.csv: each transfer grid point against its matched scratch cells.

Pairing is by seed (same k-shot subset, same data order): the gain of one seed is transfer
test accuracy minus scratch test accuracy; the grid point's gain is the mean over seeds with a
Student-t interval over seeds (a percentile bootstrap over 3 seeds is the seed range, ~75% coverage;
the t-interval's coverage is checked by simulation in the tests). A verdict is positive or negative
only when the point's paired t-test survives Benjamini-Hochberg across every grid point of the study
(q <= analysis.fdr) and the gain is at least analysis.min_effect in size; else inconclusive.

Model selection follows DomainBed, one pure function (`choose`): each arm's configuration (schedule and LR) is
chosen on its own validation accuracy, mean over seeds; the oracle (test) choice is computed the same way and
shown beside it, never instead. Every point also carries its arms' convergence shares and the best pixel baseline.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats

from transferbench.core.study import Cell, cell_axes, depth_label

# A transfer grid point, without the seed and the configuration chosen for it.
POINT = ["backbone", "weights", "target", "tuning", "frozen_depth", "frozen_groups", "frozen_fraction", "n_per_class",
         *cell_axes()]
# What a scratch cell shares with the transfer cells it is matched to (then paired by seed).
SCRATCH_POINT = ["backbone", "target", "n_per_class", *cell_axes()]
CONFIG = ["schedule", "lr"]  # chosen per arm on validation


def with_axes(runs: pd.DataFrame) -> pd.DataFrame:
    """Runs with a column for each plain grid axis (`cell_axes`): records without an axis's column take its default."""
    missing = {a: Cell.model_fields[a].default for a in cell_axes() if a not in runs}
    return runs.assign(**missing) if missing else runs


def with_tuning(runs: pd.DataFrame) -> pd.DataFrame:
    """Runs with `frozen_depth` as text, every plain axis, and every transfer run's `tuning` (which layers train, by
    which recipe); records written before train_groups and recipes existed are named by their frozen depth."""
    runs = with_axes(runs).assign(frozen_depth=runs["frozen_depth"].astype(str))
    named = runs["tuning"] if "tuning" in runs else pd.Series(np.nan, index=runs.index, dtype=object)
    fallback = pd.Series([depth_label(d, a) for d, a in zip(runs["frozen_depth"], runs["arm"])], index=runs.index)
    return runs.assign(tuning=named.where(named.notna() & (runs["arm"] == "transfer"), fallback))


def arm_labels(runs: pd.DataFrame) -> list[str]:
    """Each run's arm as tables and figures name it: its tuning ('frozen 0' ... 'probe (all)', 'groups 0', 'LP-FT'),
    'scratch', or 'pixels: <method>' (a pixel baseline's method is kept in its `backbone` column)."""
    return [f"pixels: {m}" if a == "pixels" else t
            for t, a, m in zip(with_tuning(runs)["tuning"], runs["arm"], runs["backbone"])]


def t_interval(values: np.ndarray, confidence: float) -> tuple[float, float, float]:
    """(low, high, two-sided p of mean = 0) of the Student-t interval of the mean; nan with fewer than 2 values.
    Identical values give a zero-width interval and p = 0 (or 1 when they are all 0)."""
    values = np.asarray(values, dtype=float)
    n = len(values)
    if n < 2:
        return float("nan"), float("nan"), float("nan")
    mean, se = values.mean(), values.std(ddof=1) / np.sqrt(n)
    if se == 0:
        return float(mean), float(mean), float(mean == 0)
    half = stats.t.ppf(0.5 + confidence / 2, n - 1) * se
    return float(mean - half), float(mean + half), float(2 * stats.t.sf(abs(mean) / se, n - 1))


def jackknife(estimates: np.ndarray, point: np.ndarray | float, confidence: float) -> tuple[np.ndarray, np.ndarray]:
    """Delete-one-dataset jackknife t-interval: point -/+ t(k-1) x the jackknife standard error, from the k
    estimates each made without one base dataset (elementwise over trailing axes). Chosen over a percentile
    bootstrap by simulation: with 6 to 12 base datasets it covered 89-91% at nominal 90%, the bootstrap 80-82%
    (docs/measurements.md)."""
    k = len(estimates)
    se = np.sqrt((k - 1) / k * ((estimates - estimates.mean(0)) ** 2).sum(0))
    half = stats.t.ppf(0.5 + confidence / 2, k - 1) * se
    return point - half, point + half


def bh_q(p: pd.Series) -> pd.Series:
    """Benjamini-Hochberg adjusted p-values (q); nan p-values stay nan and do not count as tests."""
    q = pd.Series(np.nan, index=p.index)
    ok = p.notna()
    if ok.any():
        q[ok] = stats.false_discovery_control(p[ok].to_numpy(), method="bh")
    return q


def verdict(gain: float, q: float, fdr: float, min_effect: float) -> str:
    """Positive / negative only for a discovery (q <= fdr) whose gain is at least min_effect in size."""
    if not q <= fdr or abs(gain) < min_effect:
        return "inconclusive"
    return "positive" if gain > 0 else "negative"


def near_the_level(gain: float, q: float, fdr: float, min_effect: float) -> bool:
    """A verdict that rests on its q-value: the gain is large enough to count, and q lies within a factor of two of
    the level either side (fdr/2 < q <= 2 fdr). Such verdicts flip between reruns on hosts whose CPUs round
    differently (docs/measurements.md): the report says so beside them."""
    return bool(abs(gain) >= min_effect and fdr / 2 < q <= 2 * fdr)


def near_counts(gain: pd.Series, q: pd.Series, verdicts: pd.Series, fdr: float, min_effect: float) -> tuple[int, int]:
    """(verdicts called positive or negative, inconclusive ones) whose q lies near the level (`near_the_level`)."""
    near = pd.Series([near_the_level(g, v, fdr, min_effect) for g, v in zip(gain, q)], index=gain.index, dtype=bool)
    decided = verdicts.isin(["positive", "negative"])
    return int((near & decided).sum()), int((near & ~decided).sum())


def verdict_rule(fdr: float, min_effect: float, confidence: float) -> str:
    return (f"A gain is the mean over seeds of paired (same seed, same k-shot subset) transfer-minus-scratch test "
            f"accuracy, with a {confidence:.0%} Student-t interval over seeds; it is called positive or negative only "
            f"when its paired t-test survives Benjamini-Hochberg across all grid points of the study (q <= {fdr:g}) "
            f"and its size is at least {100 * min_effect:g} pp; otherwise inconclusive.")


def ok_runs(runs: pd.DataFrame) -> pd.DataFrame:
    return with_tuning(runs[runs["status"] == "ok"])


def choose(runs: pd.DataFrame, keys: list[str], on: str = "val_acc") -> pd.DataFrame:
    """Model selection: per `keys`, the cells of the configuration (schedule, LR) with the best mean `on` over seeds
    (ties: the first in sorted order). Pure: the same records give the same choice."""
    if runs.empty:
        return runs
    config = [c for c in CONFIG if c not in keys]
    means = runs.groupby(keys + config, dropna=False)[on].mean().reset_index()
    best = means.loc[means.groupby(keys, dropna=False)[on].idxmax()]
    return runs.merge(best[keys + config], on=keys + config)


def paired(runs: pd.DataFrame, on: str = "val_acc") -> pd.DataFrame:
    """One row per transfer cell of its point's chosen configuration, with the matched scratch cell of scratch's own
    chosen configuration (same backbone, target, size and seed: the same k-shot subset)."""
    runs = ok_runs(runs)
    keep = SCRATCH_POINT + ["seed", "test_acc", "val_acc"] + CONFIG + [c for c in ("converged",) if c in runs]
    scratch = choose(runs[runs["arm"] == "scratch"], SCRATCH_POINT, on)[keep].rename(
        columns={c: f"scratch_{c}" for c in keep if c not in SCRATCH_POINT + ["seed"]})
    m = choose(runs[runs["arm"] == "transfer"], POINT, on).merge(scratch, on=SCRATCH_POINT + ["seed"], how="inner")
    m["gain"] = m["test_acc"] - m["scratch_test_acc"]
    return m


def pixel_baselines(runs: pd.DataFrame) -> pd.DataFrame:
    """Mean test accuracy of each pixel baseline per (target, size)."""
    px = ok_runs(runs)
    px = px[px["arm"] == "pixels"]
    return px.groupby(["target", "n_per_class", "backbone"])["test_acc"].mean().unstack("backbone") if len(px) else \
        pd.DataFrame()


GAIN_COLUMNS = POINT + ["transfer_schedule", "transfer_lr", "scratch_schedule", "scratch_lr", "transfer_mean",
                        "scratch_mean", "transfer_val_mean", "scratch_val_mean", "gain", "gain_sd", "ci_low", "ci_high",
                        "test_se", "p", "q", "n_seeds", "verdict", "transfer_converged", "scratch_converged",
                        "pixels_best", "below_pixels", "scratch_below_pixels", "flags"]


def gains(runs: pd.DataFrame, confidence: float = 0.95, fdr: float = 0.05, min_effect: float = 0.01,
          on: str = "val_acc") -> pd.DataFrame:
    """One row per transfer grid point: mean paired gain, t-interval, p and BH q over the points, verdict.
    `test_se` is the binomial standard error of one seed's gain from the finite test set (where n_test is
    recorded), to set beside the spread over seeds (`gain_sd`). `flags` names what weakens the point: an arm
    whose cells did not all converge, or transfer below the best pixel baseline."""
    m = paired(runs, on)
    pixels = pixel_baselines(runs)
    rows = []
    for key, g in m.groupby(POINT, sort=True, dropna=False):
        lo, hi, p = t_interval(g["gain"].to_numpy(), confidence)
        a, b = g["test_acc"].mean(), g["scratch_test_acc"].mean()
        n_test = g["n_test"].mean() if "n_test" in g else np.nan
        point = dict(zip(POINT, key))
        best_pixels = pixels.loc[(point["target"], point["n_per_class"])].max() if \
            (point["target"], point["n_per_class"]) in pixels.index else np.nan
        conv = {arm: g[col].astype(float).mean() if col in g else np.nan
                for arm, col in (("transfer", "converged"), ("scratch", "scratch_converged"))}
        rows.append(point | dict(
            transfer_schedule=g["schedule"].iloc[0], transfer_lr=g["lr"].iloc[0],
            scratch_schedule=g["scratch_schedule"].iloc[0], scratch_lr=g["scratch_lr"].iloc[0],
            transfer_mean=a, scratch_mean=b, transfer_val_mean=g["val_acc"].mean(),
            scratch_val_mean=g["scratch_val_acc"].mean(), gain=g["gain"].mean(),
            gain_sd=g["gain"].std(ddof=1) if len(g) > 1 else np.nan, ci_low=lo, ci_high=hi,
            test_se=np.sqrt((a * (1 - a) + b * (1 - b)) / n_test), p=p, n_seeds=len(g),
            transfer_converged=conv["transfer"], scratch_converged=conv["scratch"], pixels_best=best_pixels,
            below_pixels=bool(a < best_pixels), scratch_below_pixels=bool(b < best_pixels)))
    out = pd.DataFrame(rows, columns=[c for c in GAIN_COLUMNS if c not in ("q", "verdict", "flags")])
    out["q"] = bh_q(out["p"])
    out["verdict"] = [verdict(g, q, fdr, min_effect) for g, q in zip(out["gain"], out["q"])]
    out["flags"] = [point_flags(r) for r in out.itertuples()]
    return out[GAIN_COLUMNS]


def mean_interval(df: pd.DataFrame, by: list[str], value: str, confidence: float = 0.95) -> pd.DataFrame:
    """Per `by` group: the mean of `value` over its rows (one per seed) with its Student-t interval and p (NaN
    interval with fewer than two rows)."""
    rows = []
    for key, g in df.groupby(by, sort=True):
        lo, hi, p = t_interval(g[value].to_numpy(), confidence)
        rows.append(dict(zip(by, key)) | dict(mean=g[value].mean(), ci_low=lo, ci_high=hi, p=p, n=len(g)))
    return pd.DataFrame(rows, columns=by + ["mean", "ci_low", "ci_high", "p", "n"])


def mean_gain(runs: pd.DataFrame, by: list[str], confidence: float = 0.95) -> pd.DataFrame:
    """The mean gain over the grid points of each `by` group, with its Student-t interval over seeds: each seed's
    gains (the same k-shot subsets in both arms) are averaged over the group's points first, so the interval is
    the seed-to-seed spread of that average, the unit a rerun with new seeds would vary."""
    m = paired(runs)
    per_seed = m.groupby(by + ["seed"], as_index=False)["gain"].mean()
    out = mean_interval(per_seed, by, "gain", confidence).rename(columns={"mean": "gain", "n": "n_seeds"})
    extra = m.groupby(by).agg(transfer=("test_acc", "mean"), scratch=("scratch_test_acc", "mean")).reset_index()
    extra["n_points"] = [g.groupby(POINT, dropna=False).ngroups for _, g in m.groupby(by, sort=True)]
    return out.merge(extra, on=by)[by + ["gain", "ci_low", "ci_high", "p", "n_points", "n_seeds", "transfer",
                                         "scratch"]]


def arm_gap(runs: pd.DataFrame, a: str, b: str, confidence: float = 0.95,
            by: tuple[str, ...] | list[str] = ("target",)) -> pd.DataFrame:
    """Per target: the mean test accuracy of arm `a` minus arm `b` (tunings, e.g. 'frozen 0' and 'probe (all)'; each
    at its configuration chosen on validation, same k-shot subsets), with its t-interval over seeds ('gain' here is
    that difference) and its paired p."""
    by = list(by)
    per_seed = paired(runs).groupby(by + ["tuning", "seed"])["test_acc"].mean().unstack("tuning")
    if a not in per_seed or b not in per_seed:
        return pd.DataFrame(columns=by + ["gain", "ci_low", "ci_high", "p", "n"])
    gap = (per_seed[a] - per_seed[b]).dropna().rename("gain").reset_index()
    return mean_interval(gap, by, "gain", confidence).rename(columns={"mean": "gain"})


def point_flags(r) -> str:
    """What weakens a point's comparison, in words ('' when nothing does)."""
    flags = [f"{arm} not converged ({share:.0%})" for arm, share in
             (("transfer", r.transfer_converged), ("scratch", r.scratch_converged)) if share < 1]
    below = [arm for arm, low in (("transfer", r.below_pixels), ("scratch", r.scratch_below_pixels)) if low]
    if below:
        flags.append(f"{' and '.join(below)} below pixels ({100 * r.pixels_best:.1f}%)")
    return "; ".join(flags)


def schedule_effect(runs: pd.DataFrame) -> pd.DataFrame:
    """The schedule as a studied factor: mean test accuracy per arm (and depth) and schedule, each schedule at its
    own LR chosen on validation."""
    runs = ok_runs(runs)
    runs = runs[runs["arm"].isin(["transfer", "scratch"]) & (runs["schedule"] != "lbfgs")]
    if runs.empty:
        return pd.DataFrame()
    chosen = choose(runs, ["arm", "backbone", "weights", "target", "tuning", "n_per_class", "schedule"])
    return chosen.pivot_table(index="tuning", columns="schedule", values="test_acc", aggfunc="mean")


def fairness(runs: pd.DataFrame) -> pd.DataFrame:
    """Per arm: cells, the share that converged, that collapsed to one class, that stopped early, and median steps."""
    runs = ok_runs(runs)
    if "converged" not in runs:
        return pd.DataFrame()
    runs = runs.assign(arm_depth=arm_labels(runs))
    return runs.groupby("arm_depth").agg(cells=("cell_id", "size"), converged=("converged", "mean"),
                                         collapsed=("collapsed", "mean"), early_stopped=("early_stopped", "mean"),
                                         median_steps=("steps_taken", "median")).reset_index()


# ---------------------------------------------------------------- when transfer fails ---------------------

def negative_transfer(gains_df: pd.DataFrame) -> pd.DataFrame:
    """Negative transfer gap (Wang et al. 2019): error with transfer minus error from scratch, i.e.
    -gain, with its paired CI; `negative` where the verdict is (a discovery after FDR control, large enough)."""
    out = gains_df.copy()
    out["ntg"], out["ntg_ci_low"], out["ntg_ci_high"] = -out["gain"], -out["ci_high"], -out["ci_low"]
    out["negative"] = out["verdict"] == "negative"
    return out


def best_depth(selected: pd.DataFrame) -> pd.DataFrame:
    """Per (backbone, target, size): the frozen depth with the best validation accuracy."""
    keys = ["backbone", "weights", "target", "n_per_class"]
    best = selected.loc[selected.groupby(keys, dropna=False)["transfer_val_mean"].idxmax()]
    return best[keys + ["tuning", "frozen_depth", "frozen_groups", "frozen_fraction", "transfer_schedule",
                        "transfer_mean", "gain", "ci_low", "ci_high"]].reset_index(drop=True)


def kendall_tau_b(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Kendall's tau-b of paired samples, batched over leading axes: x, y [..., n] -> [...].
    tau_b = sum sign(dx) sign(dy) / sqrt(sum sign(dx)^2 * sum sign(dy)^2) over pairs; nan if constant."""
    sx = np.sign(x[..., :, None] - x[..., None, :])
    sy = np.sign(y[..., :, None] - y[..., None, :])
    num = (sx * sy).sum((-1, -2))
    den = np.sqrt((sx * sx).sum((-1, -2)) * (sy * sy).sum((-1, -2)))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)
