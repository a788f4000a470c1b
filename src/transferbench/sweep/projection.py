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
from transferbench.core.study import Cell, Study
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
    times = pd.to_datetime(column, utc=True, errors="coerce", format="ISO8601")
    return (times - pd.Timestamp(0, tz="UTC")).dt.total_seconds().to_numpy(dtype=float)


def recorded_rate(folder: Path, study: Study | None = None) -> Rate:
    """The wall seconds per unit of work of the cells a results folder recorded ok (its study, read from its
    study.resolved.yaml unless given, plans the cells' work)."""
    from transferbench.report.document import load_saved_study
    from transferbench.sweep.planning import plan

    fix = "name a folder written by `transferbench study` whose cells trained"
    path = folder / "runs.csv"
    if not path.is_file() or not (folder / "study.resolved.yaml").is_file():
        raise ConfigError("--reference", f"{folder} holds no runs.csv and study.resolved.yaml", fix)
    try:
        runs = pd.read_csv(path)
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigError("--reference", f"{path} is not a readable table ({type(e).__name__})", fix) from None
    missing = [c for c in ("cell_id", "status", "started", "ended", "device_used", "host") if c not in runs]
    if missing:
        raise ConfigError("--reference", f"{path} lacks columns {missing}", fix)
    study = study or load_saved_study(folder)
    cells = {c.cell_id: c for c in plan(study)}
    runs = runs.assign(start=_seconds(runs["started"]), end=_seconds(runs["ended"]))
    ok = runs[(runs["status"] == "ok") & runs["cell_id"].isin(cells) & np.isfinite(runs["start"])
              & np.isfinite(runs["end"]) & (runs["end"] >= runs["start"])].drop_duplicates("cell_id")
    wall = busy_seconds(ok["start"].to_numpy(), ok["end"].to_numpy()) if len(ok) else 0.0
    if wall <= 0:
        raise ConfigError("--reference", f"{path} records no cell that ran ok with its start and end times", fix)
    work = sum(cell_work(cells[i]) for i in ok["cell_id"])
    def joined(column: str) -> str:
        return "/".join(sorted(map(str, ok[column].dropna().unique())))

    return Rate(folder, study.name, wall / work, len(ok), wall, joined("device_used"), joined("host"),
                study.train.image_size, study.run.jobs, frozenset(cells[i].model for i in ok["cell_id"]))


def matching_runs(study: Study, root: Path = RECORDED) -> list[tuple[Path, Study]]:
    """The recorded runs under `root` at the study's image size and worker count (their saved studies readable)."""
    from transferbench.report.document import load_saved_study

    found = []
    for folder in sorted(p for p in root.glob("*") if (p / "runs.csv").is_file()) if root.is_dir() else []:
        try:
            saved = load_saved_study(folder)
        except (ConfigError, OSError):
            continue  # a damaged recorded run projects nothing; the others still do
        if saved.train.image_size == study.train.image_size and saved.run.jobs == study.run.jobs:
            found.append((folder, saved))
    return found


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
        rates = []
        for folder, saved in matching_runs(study, root):
            try:
                rates.append(recorded_rate(folder, saved))
            except ConfigError:
                continue
        if not rates:
            return (f"projected wall time: no recorded run at {study.train.image_size} px with {study.run.jobs} "
                    f"workers under {root}/ to project from (name one with --reference DIR)")
        rates.sort(key=lambda r: (r.study != study.name, -r.wall_seconds))  # its own record, else the largest
        others = [r.seconds_per_work * work for r in rates[1:]]
        notes = [f"{duration(min(others))} to {duration(max(others))} at the rates of the other {len(others)} "
                 "matching recorded run(s)"] if others else []
    line = (f"projected wall time of the cells: {duration(rates[0].seconds_per_work * work)} at the rate of "
            f"{rates[0].describe()}")
    unseen = sorted({c.model for c in cells if c.arm != "pixels"} - rates[0].models)
    if unseen:
        notes.append(f"it trained none of {unseen} (the work units count no network size)")
    return "; ".join([line, *notes]) + ". The domain measures and the report come on top; hosts of one kind differ " \
        "in speed (docs/measurements.md)."
