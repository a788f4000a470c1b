"""Confirm before failing: a test the gate flags is made again on a rerun of only its cells, with fresh seeds, and
regresses only if it is flagged again.

    comparison --flagged tests--> the new run's cells they cover --(pipeline.rerun_cells, fresh seeds)--> a rerun
    base + rerun --retest--> each flagged test again: confirmed (still a regression) or cleared (a false alarm)

What it can and cannot remove: the fresh seeds draw new k-shot subsets and initialisations for the new side only; the
base is the same in both passes. A false alarm from the new run's draw (an unlucky subset, a host's float path)
repeats only about as often as the test's level; one from the base's own draw can repeat, since both passes compare
with it (with equal seeds and spreads the two differences correlate at about 0.5). bench/confirm_rates.py measures
both rates. The retests form their own Benjamini-Hochberg families (points, aggregates) over only the flagged
tests. An aggregate flagged (per target, per arm, all points) reruns every point it averages over, so that it is
retested whole.
What no rerun of seeds changes (missing points, failed cells, structure, speed) is never rerun: it fails as it is.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd

from transferbench.analysis.compare import (
    Comparison,
    accuracies_valid,
    bh_families,
    seed_tests,
    untestable_lines,
    value_problems,
)
from transferbench.analysis.gains import SCRATCH_POINT, paired

TEST = ["kind", "measure", "what"]  # names one test in both passes
RETEST_COLUMNS = TEST + ["delta_first", "q_first", "delta", "ci_low", "ci_high", "seeds_base", "seeds_new", "q",
                         "outcome"]


def covered_cells(runs: pd.DataFrame, tests: pd.DataFrame) -> list[str]:
    """The cell ids of the run that the flagged tests were computed from: every transfer cell in a flagged test's
    group (a point, a target, an arm, all), at every schedule and LR (the choice on validation is made again), and
    the scratch cells of the same backbone, target and size, which the gains pair them with. Groups are matched as
    the tests matched them (`_test_rows`: a merge on the group's keys)."""
    transfer, scratch = runs[runs["arm"] == "transfer"], runs[runs["arm"] == "scratch"]
    covered = pd.concat([transfer.merge(pd.DataFrame([group]), on=list(group)) if group else transfer
                         for group in tests.loc[tests["flagged"], "group"]] or [transfer.iloc[:0]])
    scratch = scratch.merge(covered[SCRATCH_POINT].drop_duplicates(), on=SCRATCH_POINT)
    return sorted(set(covered["cell_id"].astype(str)) | set(scratch["cell_id"].astype(str)))


def fresh_seeds(study_seeds: list[int], base_seeds: pd.Series) -> list[int]:
    """As many seeds as the study's, above every seed either side used (a history base labels them
    '<commit>/<seed>'): no rerun repeats a draw of the runs it is compared with."""
    numbers = pd.to_numeric(base_seeds.astype(str).str.split("/").str[-1], errors="coerce").dropna()
    top = int(max([*study_seeds, *numbers.astype(int)]))
    return list(range(top + 1, top + 1 + len(study_seeds)))


def retest(first: Comparison, b_runs: pd.DataFrame, rerun: pd.DataFrame, margin: float,
           aggregate_margin: float) -> Comparison:
    """The first comparison with each flagged test made again on the rerun: it regresses only where both passes flag
    it. `confirmation` lists every flagged test with both passes' change and q, and its outcome."""
    flagged = first.tests[first.tests["flagged"]]
    b = paired(b_runs[accuracies_valid(b_runs)])
    n = paired(rerun[accuracies_valid(rerun)])
    again = seed_tests(b, n, margin, aggregate_margin, first.fdr) if len(n) else pd.DataFrame(
        columns=[*TEST, "p", "untestable"])
    again = flagged[[*TEST, "delta", "q"]].rename(columns={"delta": "delta_first", "q": "q_first"}).merge(
        again.drop(columns=["q", "flagged", "regressed"], errors="ignore"), on=TEST, how="left")
    missing = again["p"].isna() & again["untestable"].isna()
    again["untestable"] = again["untestable"].where(~missing, "its cells did not rerun ok").fillna("")
    again["q"] = bh_families(again)  # the flagged tests alone: the family the second stage tests
    confirmed = again["q"] <= first.fdr
    again["outcome"] = np.where(again["untestable"] != "", "untestable",
                                np.where(confirmed, "confirmed", "cleared"))
    tests = first.tests.drop(columns="regressed").merge(
        again[[*TEST]].assign(regressed=confirmed.to_numpy()), on=TEST, how="left")
    tests["regressed"] = tests["regressed"].astype("boolean").fillna(False).astype(bool)
    failed = rerun[rerun["status"] != "ok"]
    exact = first.exact + ([f"{len(failed)} cell(s) of the confirmation rerun not recorded ok (e.g. "
                            f"{failed['cell_id'].iloc[0]})"] if len(failed) else [])
    untestable = first.untestable + value_problems(rerun, "confirmation rerun") + \
        [f"confirmation: {line}" for line in untestable_lines(again)]
    return dataclasses.replace(first, tests=tests, exact=exact, untestable=untestable,
                               confirmation=again.reindex(columns=RETEST_COLUMNS))
