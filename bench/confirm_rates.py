"""How often the gate fails with and without confirm-before-fail, by simulation on the committed smoke records.

Each grid point's cells have a true mean and spread: those of the committed smoke run over its 4 seeds. Every
simulated base, run and confirmation rerun draws each cell's test accuracy afresh from that normal (4 seeds each), so
the null is exact (no point moved) and the base carries its own noise, as a real base does; the rerun shares the base
with the run it confirms, as in the gate. A planted regression lowers one grid point's transfer accuracy by `--drop`
in the run and in its rerun alike. Reported: the share of runs that fail the gate's seed tests (structure and speed
are not simulated) without confirmation and with it, and the share flagged at all.

    .venv/bin/python bench/confirm_rates.py --reps 200 --drop 0.15
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from transferbench.analysis.compare import POINT, compare_runs, read_runs
from transferbench.analysis.confirm import covered_cells, retest

SMOKE = Path(__file__).parents[1] / "results" / "baselines" / "smoke"
PLANTED = dict(backbone="tf_efficientnet_lite0", target="digits", tuning="frozen 0", n_per_class=4)


def draw(base: pd.DataFrame, rng: np.random.Generator, drop: float, seed_offset: int) -> pd.DataFrame:
    """Every cell of the template run drawn again from its point's mean and spread over seeds, seeds relabelled."""
    g = base.groupby(["arm", *POINT, "schedule", "lr"], dropna=False)["test_acc"]
    acc = rng.normal(g.transform("mean"), g.transform("std").fillna(0)).clip(0, 1)
    hit = pd.Series(True, index=base.index)
    for k, v in PLANTED.items():
        hit &= base[k] == v
    acc = np.where(hit & (base["arm"] == "transfer"), np.clip(acc - drop, 0, 1), acc)
    return base.assign(test_acc=acc, seed=base["seed"] + seed_offset, cell_id=base["cell_id"] + f"+{seed_offset}")


def rates(template: pd.DataFrame, reps: int, drop: float, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    fail = confirmed = flagged = 0
    for _ in range(reps):
        base = draw(template, rng, 0.0, 0)
        new = draw(template, rng, drop, 4)
        first = compare_runs(base, new, "base")
        fail += not first.ok
        if first.tests["flagged"].any():
            flagged += 1
            rerun = draw(template, rng, drop, 8)
            cells = set(covered_cells(new, first.tests))
            rerun = rerun[rerun["cell_id"].str.replace(r"\+8$", "+4", regex=True).isin(cells)]
            confirmed += not retest(first, base, rerun, 0.02, 0.01).ok
        else:
            confirmed += not first.ok
    return dict(drop_pp=100 * drop, reps=reps, fail_without=fail / reps, fail_with_confirmation=confirmed / reps,
                flagged=flagged / reps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--drop", type=float, nargs="+", default=[0.0, 0.10, 0.15, 0.25])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    template = read_runs(SMOKE)
    table = pd.DataFrame([rates(template, args.reps, d, args.seed + i) for i, d in enumerate(args.drop)])
    print(table.to_string(index=False, float_format="{:.3f}".format))


if __name__ == "__main__":
    main()
