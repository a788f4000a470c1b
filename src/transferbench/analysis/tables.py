"""Records -> tidy tables (runs, curves, gains, correlations) and back: `write_tables` builds them from a study's
records and writes the CSVs; `read_tables` rebuilds the same `Tables` from the CSVs alone (a committed baseline), so
figures and report prose can be checked without retraining. Everything derived (gains, fairness, schedules) is
computed by `analysis` from runs.csv both ways."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import pandas as pd

from transferbench.analysis import arms, predictors
from transferbench.analysis import gains as analysis
from transferbench.analysis.comparable import comparable
from transferbench.analysis.dial import dial
from transferbench.core import atomic
from transferbench.core.errors import ConfigError
from transferbench.core.study import Study
from transferbench.sweep.store import curves_table, read_domains, read_records, runs_table
from transferbench.training.source import cells_of


def write_csv(df: pd.DataFrame, path: Path) -> None:
    with atomic.replacing(path) as tmp:
        df.to_csv(tmp, index=False)


def write_tables(study: Study, out: Path, use_domains: bool = True) -> Tables:
    """runs.csv, curves.csv, gains.csv and correlations.csv from the records of this study's cells (records of
    other configurations in the folder stay out); returns every table the report and the figures read. The domain
    measures are left out when `use_domains` is false (--skip-domains)."""
    wanted = {c.cell_id for c in cells_of(study)}
    records = [r for cid, r in read_records(out / "records").items() if cid in wanted]
    runs, curves = runs_table(records), curves_table(records)
    write_csv(runs, out / "runs.csv")
    write_csv(curves, out / "curves.csv")
    domains = read_domains(out) if use_domains else pd.DataFrame()
    if domains is None:
        if (out / "domains.csv").exists():
            raise ConfigError(str(out / "domains.csv"), "damaged (truncated or edited)",
                              "rerun `transferbench study` on this study to rebuild it")
        domains = pd.DataFrame()
    estimators = pd.read_csv(out / "estimators.csv") if use_domains and (out / "estimators.csv").exists() else None
    t = derive(study, runs, curves, domains, estimators)
    write_csv(t.gains, out / "gains.csv")
    write_csv(t.correlations, out / "correlations.csv")
    for name in ("arm_accuracy", "arm_differences", "claims", "dial"):
        if len(frame := getattr(t, name)):
            write_csv(frame, out / f"{name}.csv")
    return t


def read_tables(study: Study, out: Path) -> Tables:
    """The same tables from the CSVs of a results folder (e.g. a committed baseline), without records."""
    runs = pd.read_csv(out / "runs.csv", dtype={"frozen_depth": str})
    curves = pd.read_csv(out / "curves.csv") if (out / "curves.csv").exists() else curves_table([])
    domains = read_domains(out)
    estimators = pd.read_csv(out / "estimators.csv") if (out / "estimators.csv").exists() else None
    return derive(study, runs, curves, pd.DataFrame() if domains is None else domains, estimators)


def depth_prediction(runs: pd.DataFrame, domains: pd.DataFrame) -> dict | None:
    names, kinds = arms.arm_names(runs), arms.condition_kinds(runs)
    if not (names["first"] and names["last"]):
        return None
    return arms.depth_predicts(runs, domains, names["first"], names["last"], kinds["input"])


@dataclass(frozen=True)
class Tables:
    """Everything the report and the figures read, each computed once from the runs and the domain measures."""

    runs: pd.DataFrame
    curves: pd.DataFrame
    gains: pd.DataFrame  # per grid point: transfer minus scratch, each arm's schedule and LR chosen on val
    oracle: pd.DataFrame  # the same, chosen on test: how much choosing on val costs
    domains: pd.DataFrame
    correlations: pd.DataFrame
    estimators: pd.DataFrame | None
    fairness: pd.DataFrame
    schedules: pd.DataFrame
    order: list[str]  # target conditions, measured near -> far (or as the study lists them)
    ordered_by: str
    ranking: pd.DataFrame
    duel: dict | None  # the top two estimators' bootstrap (only from enough targets)
    arm_accuracy: pd.DataFrame  # the arms beyond frozen prefixes (empty where the study compares none)
    best_arms: pd.DataFrame
    arm_differences: pd.DataFrame
    claims: pd.DataFrame
    depth_prediction: dict | None
    dial: pd.DataFrame  # gain against distance per backbone x tuning x size: the line and its break-even
    dial_band: pd.DataFrame  # the line's confidence band across the dial, for the figure

    @property
    def selected(self) -> pd.DataFrame:
        """The gains: each arm's configuration chosen on validation."""
        return self.gains

    def frames(self) -> dict[str, pd.DataFrame]:
        """The tables that are data frames, by name."""
        return {f.name: v for f in fields(self) if isinstance(v := getattr(self, f.name), pd.DataFrame)}


def derive(study: Study, runs: pd.DataFrame, curves: pd.DataFrame, domains: pd.DataFrame,
           estimators: pd.DataFrame | None) -> Tables:
    """Everything the report computes from the runs and the domain measures (pure), each once: the gains, the
    target order (measured near -> far), the estimator ranking and its top-two bootstrap (only from enough
    targets)."""
    a = study.analysis
    gains = analysis.negative_transfer(analysis.gains(runs, a.confidence, a.fdr, a.min_effect))
    gains = gains.merge(comparable(runs, a.confidence, a.fdr, a.min_effect), on=analysis.POINT, how="left")
    classes = runs.groupby("target")["num_classes"].first() if "num_classes" in runs else None
    corr = predictors.correlations(domains, gains, a.n_bootstrap // 2, a.confidence, estimators=estimators,
                                   classes=classes)
    order, ordered_by = predictors.distance_order([c.condition for c in study.targets], domains)
    ranking = predictors.measure_ranking(corr)
    enough = gains["target"].nunique() >= predictors.MIN_TARGETS_TO_RANK and not domains.empty and len(ranking)
    duel = predictors.top_two(domains, gains, ranking, a.n_bootstrap // 2, a.confidence, estimators=estimators,
                              classes=classes) \
        if enough else None
    lines, band = dial(gains, domains, list(predictors.DISTANCES), a.confidence)
    compared = arms.several_arms(runs)  # which layers to train: the arms against full fine-tuning
    accuracy = arms.arm_accuracy(runs, a.confidence) if compared else pd.DataFrame()
    return Tables(runs=runs, curves=curves, gains=gains, arm_accuracy=accuracy, best_arms=arms.best_arms(accuracy),
                  arm_differences=arms.differences(runs, a.confidence, a.fdr, a.min_effect) if compared else
                  pd.DataFrame(), claims=arms.claims(runs, a.confidence, a.min_effect) if compared else pd.DataFrame(),
                  depth_prediction=depth_prediction(runs, domains) if compared else None,
                  oracle=analysis.gains(runs, a.confidence, a.fdr, a.min_effect, on="test_acc"), domains=domains,
                  correlations=corr, estimators=estimators, fairness=analysis.fairness(runs),
                  schedules=analysis.schedule_effect(runs), order=order, ordered_by=ordered_by, ranking=ranking,
                  duel=duel, dial=lines, dial_band=band)
