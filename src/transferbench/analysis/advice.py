"""The gain on a new target, predicted from its cheap measures: a small ridge regression fitted on a study's records
(one row per target condition x backbone x tuning x size), with prediction intervals by jackknife+ over base datasets
(Barber, Candes, Ramdas & Tibshirani 2021, leaving out one base dataset at a time: dial levels of one dataset are not
independent), and its validation: leave-one-base-dataset-out coverage of those intervals and the error beside the
trivial predictor (size, number of classes and tuning only).

Pure numpy and pandas: `rows` builds the table from a study's tables, `fit` returns a `Predictor` (plain numbers,
saved as JSON), `validate` refits the whole procedure without each base dataset in turn and scores it there.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd

from transferbench.measures import LABEL_FREE, measures

FORMAT = 1  # bump when the features, the model or the JSON layout change: an older file is then refused
OUTCOMES = {"gain": "gain over scratch (accuracy)", "transfer_mean": "transfer accuracy",
            "eff_log2": "log2 effective data transferred"}
TRIVIAL = ["log2_n", "log2_classes"]  # what the trivial predictor knows (besides the tuning)
CANDIDATES = measures()  # every registered measure; those a table lacks are dropped
ALPHAS = (0.1, 1.0, 10.0, 100.0)  # ridge strengths on standardised features, chosen by inner grouped CV
LEVELS = (0.8, 0.9)  # the prediction intervals' nominal coverage
MIN_DATASETS = 3  # a tuning seen on fewer base datasets gets no prediction: its effect would rest on one or two
OUT_OF_RANGE_SD = 0.5  # a measure this many training SDs beyond the fitted range: the target is outside it


def measured(domains: pd.DataFrame, estimators: pd.DataFrame | None) -> pd.DataFrame:
    """Per (backbone, target[, size]): the label-free distances on the target's images and the estimators on the
    k-shot subsets the cells trained on (mean over seeds), with the base dataset."""
    keys = ["backbone", "weights", "target"]
    label_free = [m for m in measures(*LABEL_FREE) if m in domains]
    m = domains[keys + ["dataset"] + label_free]
    if estimators is not None and len(estimators):
        est = [c for c in measures() if c in estimators and c not in label_free]
        m = m.merge(estimators.groupby(keys + ["n_per_class"])[est].mean().reset_index(), on=keys)
    return m


def rows(gains: pd.DataFrame, domains: pd.DataFrame, estimators: pd.DataFrame | None,
         classes: pd.Series) -> pd.DataFrame:
    """One row per (backbone, target, tuning, size): the outcomes (gain, transfer accuracy, log2 effective data; the
    arm's configuration chosen on validation) beside the measures, the base dataset and the trivial features."""
    on = ["backbone", "weights", "target"] + (["n_per_class"] if estimators is not None and len(estimators) else [])
    m = gains.merge(measured(domains, estimators), on=on)
    m["eff_log2"] = np.log2(m["eff_multiplier"].astype(float)) if "eff_multiplier" in m else np.nan
    return _trivial_features(m, m["target"].map(classes))


def rows_for_new_target(domains: pd.DataFrame, estimators: pd.DataFrame, tunings: list[str],
                        num_classes: int) -> pd.DataFrame:
    """The same features for a target without records: one row per (backbone, size, tuning)."""
    m = measured(domains, estimators).merge(pd.DataFrame(dict(tuning=tunings)), how="cross")
    return _trivial_features(m, pd.Series(num_classes, index=m.index))


def _trivial_features(m: pd.DataFrame, classes: pd.Series) -> pd.DataFrame:
    m["log2_n"] = np.log2(m["n_per_class"].astype(float))
    m["log2_classes"] = np.log2(classes.astype(float))
    return m.reset_index(drop=True)


@dataclass
class Ridge:
    """y = b + tuning offset + coef . (x - center) / scale; the penalty spares the intercept and the tuning offsets."""
    features: list[str]
    tunings: list[str]
    center: list[float]
    scale: list[float]
    alpha: float
    coef: list[float]
    offsets: list[float]  # per tuning, intercept included

    def predict(self, x: np.ndarray, tuning: np.ndarray) -> np.ndarray:
        z = (x - np.array(self.center)) / np.array(self.scale)
        z = np.where(np.isfinite(z), z, 0.0)  # a measure missing for a row sits at the training mean
        offsets = dict(zip(self.tunings, self.offsets))
        return z @ np.array(self.coef) + np.array([offsets.get(t, np.nan) for t in tuning])


def _solve(x: np.ndarray, tuning: np.ndarray, y: np.ndarray, features: list[str], alpha: float) -> Ridge:
    center = np.nanmean(x, 0) if len(x) else np.zeros(x.shape[1])
    scale = np.nanstd(x, 0)
    scale = np.where(np.isfinite(scale) & (scale > 1e-12), scale, 1.0)
    z = (x - center) / scale
    z = np.where(np.isfinite(z), z, 0.0)
    tunings = sorted(set(tuning))
    d = np.column_stack([z] + [(tuning == t).astype(float) for t in tunings])
    penalty = np.diag([alpha] * z.shape[1] + [0.0] * len(tunings))
    beta = np.linalg.lstsq(d.T @ d + penalty, d.T @ y, rcond=None)[0]
    k = z.shape[1]
    return Ridge(features, tunings, center.tolist(), scale.tolist(), alpha, beta[:k].tolist(), beta[k:].tolist())


def fit_ridge(table: pd.DataFrame, features: list[str], outcome: str) -> Ridge:
    """Ridge with its strength chosen by leave-one-base-dataset-out error within `table` (the smallest alpha on a
    tie); with fewer than three base datasets, or no fold to score, the middle strength."""
    ok = table[table[outcome].notna()]
    x, tuning, y, groups = ok[features].to_numpy(float), ok["tuning"].to_numpy(), ok[outcome].to_numpy(float), \
        ok["dataset"].to_numpy()
    alpha = ALPHAS[len(ALPHAS) // 2]
    if len(set(groups)) >= 3:
        errors = []
        for a in ALPHAS:
            err = []
            for g in sorted(set(groups)):
                held = groups == g
                if not set(tuning[held]) <= set(tuning[~held]):
                    continue
                model = _solve(x[~held], tuning[~held], y[~held], features, a)
                err.append(np.abs(model.predict(x[held], tuning[held]) - y[held]))
            errors.append(np.concatenate(err).mean() if err else np.inf)
        if np.isfinite(errors).any():
            alpha = ALPHAS[int(np.argmin(errors))]
    return _solve(x, tuning, y, features, alpha)


@dataclass
class Jackknife:
    """One outcome's model on every row, and jackknife+ over base datasets: per base dataset, the model fitted
    without it and the absolute residuals of its rows. The quantiles pool the rows of all datasets, so a dataset with
    many rows weighs more and the finite-sample guarantee of jackknife+ (which needs exchangeable units: here
    datasets, too few for it at 90%) is approximate; `validate` measures the coverage actually reached."""
    outcome: str
    full: Ridge
    left_out: dict[str, Ridge]
    residuals: dict[str, list[float]]

    def predict(self, x: np.ndarray, tuning: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Point predictions and the jackknife+ interval at `level` for each row of x: the floor(a(n+1))-th smallest
        of mu_-g(i)(x) - R_i and the ceil((1-a)(n+1))-th smallest of mu_-g(i)(x) + R_i, over the n residuals."""
        lows, highs = [], []
        for g, r in self.residuals.items():
            mu = self.left_out[g].predict(x, tuning)[:, None]
            lows.append(np.where(np.isfinite(mu), mu, -np.inf) - np.array(r)[None, :])  # no model: no bound
            highs.append(np.where(np.isfinite(mu), mu, np.inf) + np.array(r)[None, :])
        low, high = np.sort(np.concatenate(lows, 1), 1), np.sort(np.concatenate(highs, 1), 1)
        n, a = low.shape[1], 1 - level
        # rounded first: 1 - 0.9 is 0.0999...98 in floating point, and floor(0.1 x 10) must be 1, not 0
        i, j = math.floor(round(a * (n + 1), 9)), math.ceil(round((1 - a) * (n + 1), 9))
        lo = low[:, i - 1] if i >= 1 else np.full(len(x), -np.inf)
        hi = high[:, j - 1] if j <= n else np.full(len(x), np.inf)
        return self.full.predict(x, tuning), lo, hi


def fit_jackknife(table: pd.DataFrame, features: list[str], outcome: str) -> Jackknife | None:
    """None where fewer than three base datasets carry the outcome (no honest interval). Only the tunings measured on
    enough base datasets for this outcome take part."""
    ok = answerable(table[table[outcome].notna()])
    groups = sorted(set(ok["dataset"]))
    if len(groups) < 3:
        return None
    left_out, residuals = {}, {}
    for g in groups:
        held, rest = ok[ok["dataset"] == g], ok[ok["dataset"] != g]
        model = fit_ridge(rest, features, outcome)
        pred = model.predict(held[features].to_numpy(float), held["tuning"].to_numpy())
        keep = np.isfinite(pred)  # a tuning only this dataset has cannot be scored without it
        left_out[g] = model
        residuals[g] = np.abs(pred - held[outcome].to_numpy(float))[keep].tolist()
    return Jackknife(outcome, fit_ridge(ok, features, outcome), left_out, residuals)


def answerable(table: pd.DataFrame) -> pd.DataFrame:
    """The rows of tunings measured on at least MIN_DATASETS base datasets (per outcome: on the rows carrying it)."""
    seen = table.groupby("tuning")["dataset"].nunique()
    return table[table["tuning"].isin(seen[seen >= MIN_DATASETS].index)]


@dataclass
class Predictor:
    """Everything `advise` needs, as plain numbers: per outcome the measured and the trivial model with their
    jackknife+ residuals, the training conditions (for the nearest known ones and the range), and the validation."""
    features: list[str]
    models: dict[str, Jackknife]
    trivial: dict[str, Jackknife]
    conditions: list[dict]
    source: dict
    validation: dict = field(default_factory=dict)
    format: int = FORMAT

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: dict) -> Predictor:
        if raw.get("format") != FORMAT:
            raise ValueError(f"predictor format {raw.get('format')}, this version reads {FORMAT}")

        def jack(j: dict) -> Jackknife:
            return Jackknife(j["outcome"], Ridge(**j["full"]), {g: Ridge(**r) for g, r in j["left_out"].items()},
                             j["residuals"])

        return cls(raw["features"], {k: jack(v) for k, v in raw["models"].items()},
                   {k: jack(v) for k, v in raw["trivial"].items()}, raw["conditions"], raw["source"],
                   raw["validation"], raw["format"])

    @property
    def tunings(self) -> list[str]:
        return sorted({t for j in self.models.values() for t in j.full.tunings})

    def predict(self, table: pd.DataFrame, use_trivial: bool | None = None) -> pd.DataFrame:
        """Per row of `table` (the features and a tuning) and outcome: the point and its 80% and 90% intervals. The
        measured model unless validation found it no better than the trivial one for that outcome."""
        out = table[[c for c in ("backbone", "target", "tuning", "n_per_class") if c in table]].copy()
        for outcome in self.models:
            trivial = self.validation.get(outcome, {}).get("use_trivial", False) if use_trivial is None \
                else use_trivial
            jack = (self.trivial if trivial else self.models)[outcome]
            x = table[jack.full.features].to_numpy(float)
            for level in LEVELS:
                point, lo, hi = jack.predict(x, table["tuning"].to_numpy(), level)
                out[outcome], out[f"{outcome}_lo{int(level * 100)}"], out[f"{outcome}_hi{int(level * 100)}"] = \
                    point, lo, hi
            out[f"{outcome}_model"] = "trivial" if trivial else "measures"
        return out


def fit(table: pd.DataFrame, source: dict, validate_it: bool = True) -> Predictor:
    """The predictor on every answerable row; with `validate_it`, its leave-one-base-dataset-out validation."""
    table = answerable(table)
    features = [m for m in CANDIDATES if m in table and table[m].notna().any()] + TRIVIAL
    models = {o: j for o in OUTCOMES if o in table and (j := fit_jackknife(table, features, o))}
    trivial = {o: j for o in OUTCOMES if o in table and (j := fit_jackknife(table, TRIVIAL, o))}
    conditions = table.groupby(["backbone", "target", "dataset", "n_per_class"])[features].mean().reset_index()
    p = Predictor(features, models, trivial, conditions.to_dict("records"), source)
    if validate_it:
        p.validation = validate(table, source)
    return p


def validate(table: pd.DataFrame, source: dict) -> dict:
    """Leave one base dataset out: fit the whole procedure (ridge strength, jackknife+) on the others, predict the
    held-out rows; per outcome, the share of rows inside the 80% and 90% intervals and the mean absolute error, for
    the measured and the trivial predictor, and whether the measures beat the trivial one (lower error)."""
    table = answerable(table)
    preds: dict[str, list[pd.DataFrame]] = {"measures": [], "trivial": []}
    for g in sorted(set(table["dataset"])):
        rest, held = table[table["dataset"] != g], table[table["dataset"] == g]
        held = held[held["tuning"].isin(set(rest["tuning"]))]
        if held.empty or rest["dataset"].nunique() < 3:
            continue
        p = fit(rest, source, validate_it=False)
        for kind in preds:
            preds[kind].append(p.predict(held, use_trivial=kind == "trivial").assign(
                dataset=g, **{f"true_{o}": held[o].to_numpy() for o in OUTCOMES if o in held}))
    out = {}
    for outcome in OUTCOMES:
        scores: dict[str, dict] = {}
        for kind, frames in preds.items():
            if not frames or outcome not in frames[0]:
                continue
            d = pd.concat(frames)
            d = d[d[f"true_{outcome}"].notna()]
            unpredicted = int(d[outcome].isna().sum())  # a tuning too rare once its dataset is held out
            d = d[d[outcome].notna()]
            truth = d[f"true_{outcome}"]
            scores[kind] = dict(
                n=len(d), unpredicted=unpredicted, datasets=int(d["dataset"].nunique()),
                mae=float((d[outcome] - truth).abs().mean()),
                **{f"coverage{int(lv * 100)}": float(((d[f"{outcome}_lo{int(lv * 100)}"] <= truth)
                                                      & (truth <= d[f"{outcome}_hi{int(lv * 100)}"])).mean())
                   for lv in LEVELS},
                per_dataset={k: float(v) for k, v in d.assign(err=(d[outcome] - truth).abs())
                             .groupby("dataset")["err"].mean().items()})
        if scores:
            beats = {"measures", "trivial"} <= set(scores) and scores["measures"]["mae"] < scores["trivial"]["mae"]
            out[outcome] = dict(scores, beats_trivial=bool(beats), use_trivial=not beats)
    return out
