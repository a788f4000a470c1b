"""How long a study's cells will take, projected from a recorded run (`transferbench plan`): the recorded run's wall
time per unit of work (`costs.cell_work`, the progress bar's weights) times the planned cells' work.

A recorded run is any results folder (`results/baselines/*` by default, or `plan --reference DIR`): its runs.csv
says when each cell started and ended. Its wall time is the time its cells were running (the union of their
intervals: a resumed run's pause does not count, parallel workers do not count twice), so the rate carries that
run's device, parallelism, packing and early stopping. Only runs at the planned image size and worker count are
used: neither is in the work units. The domain measures and the report come on top."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from transferbench.core.errors import ConfigError
from transferbench.core.study import Cell, Study, load_saved_study
from transferbench.sweep.costs import cell_work

RECORDED = Path("results/baselines")  # the committed runs, from the repository root


@dataclass(frozen=True)
class Rate:
    """A recorded run's wall seconds per unit of work, and what it ran on."""

    source: Path
    study: str
    seconds_per_work: float
    cells: int
    wall_seconds: float
    device: str
    host: str
    image_size: int
    jobs: int
    models: frozenset[str]

    def describe(self) -> str:
        return (f"{self.source} ({self.device}, {self.image_size} px, {self.jobs} workers, host {self.host}: "
                f"{self.cells} cells in {duration(self.wall_seconds)})")


def duration(seconds: float) -> str:
    if seconds >= 7200:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.0f} min" if seconds >= 600 else f"{seconds / 60:.1f} min"


PAUSE = 60.0  # seconds with no cell running that count as a pause (a resumed run), not as the run's time


def busy_seconds(started: np.ndarray, ended: np.ndarray, pause: float = PAUSE) -> float:
    """The wall time of cells running over [started, ended] (seconds): the length of the intervals' union with gaps
    shorter than `pause` counted in (between cells and LR phases the harness itself takes a few seconds)."""
    if not len(started):
        return 0.0
    order = np.argsort(started, kind="stable")
    total, lo, hi = 0.0, started[order[0]], ended[order[0]]
    for a, b in zip(started[order[1:]], ended[order[1:]]):
        if a - hi >= pause:
            total, lo = total + hi - lo, a
        hi = max(hi, b)
    return float(total + hi - lo)


def _seconds(column: pd.Series) -> np.ndarray:
    """ISO 8601 times as seconds since the epoch; nan where a value is no such time (or out of pandas' range)."""
    def one(value) -> float:
        try:
            t = pd.Timestamp(value)
            return (t if t.tzinfo else t.tz_localize("UTC")).timestamp()
        except (ValueError, TypeError, OverflowError):  # pandas' OutOfBoundsDatetime is a ValueError
            return np.nan

    try:
        times = pd.to_datetime(column, utc=True, errors="coerce", format="ISO8601")
        return (times - pd.Timestamp(0, tz="UTC")).dt.total_seconds().to_numpy(dtype=float)
    except (ValueError, OverflowError):  # a time beyond the year 2262 is not coerced: value by value
        return np.array([one(v) for v in column], dtype=float)


FIX = "name a folder written by `transferbench study` whose cells trained"


def recorded_rate(folder: Path, study: Study | None = None) -> Rate:
    """The wall seconds per unit of work of the cells a results folder recorded ok (its study, read from its
    study.resolved.yaml unless given, plans the cells' work). Refused, naming --reference, where a time of a cell
    recorded ok cannot be true: missing, ended before it started, or longer than all cells' recorded seconds
    together."""
    path = folder / "runs.csv"
    if not path.is_file() or not (folder / "study.resolved.yaml").is_file():
        raise ConfigError("--reference", f"{folder} holds no runs.csv and study.resolved.yaml", FIX)
    try:
        runs = pd.read_csv(path)
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigError("--reference", f"{path} is not a readable table ({type(e).__name__})", FIX) from None
    missing = [c for c in ("cell_id", "status", "started", "ended", "device_used", "host") if c not in runs]
    if missing:
        raise ConfigError("--reference", f"{path} lacks columns {missing}", FIX)
    study, cells = _planned(folder, study)
    runs = runs.assign(start=_seconds(runs["started"]), end=_seconds(runs["ended"]))
    ok = runs[(runs["status"] == "ok") & runs["cell_id"].isin(cells)].drop_duplicates("cell_id")
    _check_times(ok, path)
    wall = busy_seconds(ok["start"].to_numpy(), ok["end"].to_numpy()) if len(ok) else 0.0
    if wall <= 0:
        raise ConfigError("--reference", f"{path} records no cell of its study that ran ok", FIX)
    work = sum(cell_work(cells[i]) for i in ok["cell_id"])
    jobs = pd.to_numeric(ok["jobs"], errors="coerce").dropna() if "jobs" in ok else pd.Series(dtype=float)

    def joined(column: str) -> str:
        return "/".join(sorted(map(str, ok[column].dropna().unique())))

    return Rate(folder, study.name, wall / work, len(ok), wall, joined("device_used"), joined("host"),
                study.train.image_size, int(jobs.mode().iloc[0]) if len(jobs) else study.run.jobs,
                frozenset(cells[i].model for i in ok["cell_id"]))


def _planned(folder: Path, study: Study | None) -> tuple[Study, dict[str, Cell]]:
    """A recorded run's study and its planned cells by id; what cannot be read or planned blames --reference."""
    from transferbench.sweep.planning import plan

    try:
        study = study or load_saved_study(folder)
        return study, {c.cell_id: c for c in plan(study)}
    except ConfigError as e:
        raise ConfigError("--reference", f"the study of {folder} cannot be planned here ({e.field}: {e.problem})",
                          "name a results folder of a study this version can plan") from None


def _check_times(ok: pd.DataFrame, path: Path) -> None:
    span = ok["end"] - ok["start"]
    bad = ~np.isfinite(span) | (span < 0)
    if "cell_seconds" in ok:  # a cell's time cannot exceed every cell's recorded seconds together (plus a pause)
        bad |= span > pd.to_numeric(ok["cell_seconds"], errors="coerce").sum() + PAUSE
    if bad.any():
        first = ok[bad].iloc[0]
        raise ConfigError("--reference", f"{path}: {int(bad.sum())} cell(s) recorded ok have no true start and end "
                          f"(e.g. {first['cell_id']}: {first['started']} to {first['ended']})",
                          "rebuild the table with `transferbench report STUDY`, or name another run")


def recorded_runs(study: Study, root: Path = RECORDED) -> tuple[list[Rate], list[str]]:
    """The rates of the recorded runs under `root` at the study's image size and worker count, and why the
    damaged ones were left out."""
    rates, damaged = [], []
    for folder in sorted(p for p in root.glob("*") if (p / "runs.csv").is_file()) if root.is_dir() else []:
        try:
            saved = load_saved_study(folder)
            if saved.train.image_size == study.train.image_size:
                rates.append(recorded_rate(folder, saved))
        except (ConfigError, OSError) as e:  # a damaged recorded run projects nothing; the others still do
            damaged.append(f"{folder}: {e}")
    return [r for r in rates if r.jobs == study.run.jobs], damaged


def projection(study: Study, cells: list[Cell], reference: Path | None = None, root: Path = RECORDED) -> str:
    """The line `plan` prints: the cells' wall time at the rate of the named recorded run, or of a matching one
    under `root` (the study's own record, else the largest) with the range the other matching runs give (how far
    one run's rate carries)."""
    work = sum(cell_work(c) for c in cells)
    if reference is not None:
        rate = recorded_rate(reference)
        notes = [] if (rate.image_size, rate.jobs) == (study.train.image_size, study.run.jobs) else [
            f"it ran {rate.image_size} px with {rate.jobs} workers, this plan {study.train.image_size} px with "
            f"{study.run.jobs}: the work units count neither"]
        rates = [rate]
    else:
        rates, damaged = recorded_runs(study, root)
        notes = [f"{len(damaged)} damaged recorded run(s) left out ({damaged[0]})"] if damaged else []
        if not rates:
            return "; ".join([f"projected wall time: no recorded run at {study.train.image_size} px with "
                              f"{study.run.jobs} workers under {root}/ to project from (name one with --reference "
                              "DIR)", *notes])
        rates.sort(key=lambda r: (r.study != study.name, -r.wall_seconds))  # its own record, else the largest
        others = [r.seconds_per_work * work for r in rates[1:]]
        notes.insert(0, f"{duration(min(others))} to {duration(max(others))} at the rates of the other "
                     f"{len(others)} matching recorded run(s)" if others else "the only matching recorded run: no "
                     "range")
    line = (f"projected wall time of the cells: {duration(rates[0].seconds_per_work * work)} at the rate of "
            f"{rates[0].describe()}")
    unseen = sorted({c.model for c in cells if c.arm != "pixels"} - rates[0].models)
    if unseen:
        notes.append(f"it trained none of {unseen} (the work units count no network size)")
    return "; ".join([line, *notes]) + ". The domain measures and the report come on top; hosts of one kind differ " \
        "in speed (docs/measurements.md)."
