"""Replay the progress bar's ETA on a recorded run: how far off it would have been, counting cells or weighing them.

    .venv/bin/python bench/eta_replay.py results/baselines/domain_gap

The cells in the order they ended (runs.csv `ended`); at each, ETA = elapsed x (work left / work done), the average
rate since the start (what runner.WorkBar shows, smoothing=0); the truth = the last `ended` minus this one. Prints the
signed error at 10%, 20%, ... of the wall time and the largest |error| between 10% and 90%.
"""

import sys
from pathlib import Path

import numpy as np
import pandas as pd

from transferbench.core.study import load_saved_study
from transferbench.sweep.costs import cell_work
from transferbench.sweep.planning import plan


def seconds(column: pd.Series) -> np.ndarray:
    return (pd.to_datetime(column, utc=True) - pd.Timestamp(0, tz="UTC")).dt.total_seconds().to_numpy()


def replay(folder: Path) -> None:
    cells = {c.cell_id: c for c in plan(load_saved_study(folder))}
    runs = pd.read_csv(folder / "runs.csv")
    runs = runs[runs["cell_id"].isin(cells)].sort_values("ended", kind="stable")
    start, ended = seconds(runs["started"]).min(), seconds(runs["ended"])
    wall = ended.max() - start
    elapsed, truth = ended - start, ended.max() - ended
    print(f"{folder.name}: {len(runs)} cells, {wall / 60:.1f} min")
    for name, weigh in (("cells counted", lambda c: 1.0), ("cells weighed (cell_work)", cell_work)):
        w = np.array([weigh(cells[i]) for i in runs["cell_id"]])
        done = np.cumsum(w)
        eta = elapsed * (w.sum() - done) / done
        error = (eta - truth) / np.where(truth > 0, truth, np.nan)
        at = [np.searchsorted(elapsed, f * wall) for f in (0.1, 0.2, 0.3, 0.5, 0.7, 0.9)]
        inside = (elapsed >= 0.1 * wall) & (elapsed <= 0.9 * wall)
        print(f"  {name:<26} max |error| 10-90%: {np.nanmax(np.abs(error[inside])):.0%};  "
              + "  ".join(f"{f:.0%}: {eta[j] / 60:.1f} vs {truth[j] / 60:.1f} min ({error[j]:+.0%})"
                          for f, j in zip((0.1, 0.2, 0.3, 0.5, 0.7, 0.9), at)))


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        replay(Path(arg))
