"""Confirm before failing, on the committed smoke records: which cells a flagged test reruns, the fresh seeds, and the
retest that clears a single injected false positive and keeps a real regression failing. (The same through the CLI,
with cells really trained again, is in test_gate_calibration.py.)"""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from transferbench.analysis.compare import compare_runs, read_runs, render, render_markdown
from transferbench.analysis.confirm import covered_cells, fresh_seeds, retest
from transferbench.cli import main

SMOKE = Path(__file__).parents[1] / "results" / "baselines" / "smoke"
POINT = dict(backbone="tf_efficientnet_lite0", target="textures", tuning="frozen 0", n_per_class=4)


def at(runs: pd.DataFrame, arm: str = "transfer", **where) -> pd.Series:
    hit = runs["arm"] == arm
    for k, v in where.items():
        hit &= runs[k] == v
    return hit


def collapsed(runs: pd.DataFrame) -> pd.DataFrame:
    """One grid point's transfer cells at 5% accuracy: a drop every test of that point flags."""
    return runs.assign(test_acc=runs["test_acc"].where(~at(runs, **POINT), 0.05))


def rerun_of(runs: pd.DataFrame, cells: list[str], noise: float = 0.01, seed: int = 0) -> pd.DataFrame:
    """These cells as a rerun at fresh seeds would record them: seeds 4-7, other ids, the accuracies moved by noise."""
    rng = np.random.default_rng(seed)
    r = runs[runs["cell_id"].isin(cells)]
    test_acc = (r["test_acc"] + rng.normal(0, noise, len(r))).clip(0, 1)
    return r.assign(seed=r["seed"] + 4, cell_id=r["cell_id"] + "-again", test_acc=test_acc)


@pytest.fixture(scope="module")
def base():
    return read_runs(SMOKE)


@pytest.fixture(scope="module")
def flagged(base):
    first = compare_runs(base, collapsed(base), "base")
    assert not first.ok and first.tests["flagged"].any()
    return first


def test_a_point_covers_its_cells_at_every_schedule_and_the_scratch_cells_it_pairs_with(base, flagged):
    only_point = flagged.tests[flagged.tests["kind"] == "point"].assign(flagged=False)
    one = only_point.index[(only_point["measure"] == "gain") & (only_point["what"].str.contains("textures frozen 0 4"))
                           & only_point["what"].str.startswith("tf_efficientnet_lite0 ")]
    assert len(one) == 1
    cells = set(covered_cells(base, only_point.assign(flagged=only_point.index.isin(one))))
    transfer = set(base.loc[at(base, **POINT), "cell_id"])
    scratch = set(base.loc[at(base, "scratch", backbone="tf_efficientnet_lite0", target="textures", n_per_class=4),
                           "cell_id"])
    assert len(transfer) == 8 and len(scratch) == 8  # 2 schedules x 4 seeds each
    assert cells == transfer | scratch


def test_an_aggregate_covers_every_point_it_averages_and_a_scratch_test_its_pairings(base, flagged):
    tests = flagged.tests.assign(flagged=False)
    target = tests.index[(tests["kind"] == "target") & (tests["what"] == "digits") & (tests["measure"] == "gain")]
    cells = set(covered_cells(base, tests.assign(flagged=tests.index.isin(target))))
    assert cells == set(base.loc[(base["target"] == "digits") & base["arm"].isin(["transfer", "scratch"]), "cell_id"])
    everything = tests.index[tests["kind"] == "all points"][:1]
    assert set(covered_cells(base, tests.assign(flagged=tests.index.isin(everything)))) == \
        set(base.loc[base["arm"].isin(["transfer", "scratch"]), "cell_id"])  # no pixel baseline: no test reads one
    scratch = tests.index[(tests["kind"] == "point") & (tests["measure"] == "scratch accuracy")][:1]
    group = tests.loc[scratch[0], "group"]
    cells = set(covered_cells(base, tests.assign(flagged=tests.index.isin(scratch))))
    where = {k: group[k] for k in ("backbone", "target", "n_per_class")}
    assert cells == set(base.loc[at(base, **where) | at(base, "scratch", **where), "cell_id"])
    assert len(cells) == 20  # frozen 0 at two schedules (8), the L-BFGS probe (4), their scratch cells (8)


def test_fresh_seeds_lie_above_every_seed_either_side_used():
    assert fresh_seeds([0, 1, 2, 3], pd.Series([0, 1, 2, 3])) == [4, 5, 6, 7]
    assert fresh_seeds([0, 1], pd.Series(["abc/0", "def/7"])) == [8, 9]  # a history base's labels
    assert fresh_seeds([10, 11, 12], pd.Series([0, 1])) == [13, 14, 15]


def test_a_single_injected_false_positive_is_cleared(base, flagged):
    """The first pass flags the collapsed point (and aggregates it moves); the cells rerun with the code unchanged
    show no drop, so nothing is confirmed and the gate passes."""
    cells = covered_cells(collapsed(base), flagged.tests)
    final = retest(flagged, base, rerun_of(base, cells), 0.02, 0.01)
    assert final.ok, final.problems
    assert (final.confirmation["outcome"] == "cleared").all()
    assert len(final.confirmation) == int(flagged.tests["flagged"].sum())
    assert final.tests["flagged"].sum() == flagged.tests["flagged"].sum() and not final.tests["regressed"].any()
    assert "0 confirmed" in render(final, Path("b"), Path("n"))
    md = render_markdown(final, Path("b"), Path("n"))
    assert "## transferbench gate: PASS" in md and "### Confirmation" in md and "| cleared |" in md


def test_a_real_regression_is_confirmed_and_still_fails(base, flagged):
    cells = covered_cells(collapsed(base), flagged.tests)
    final = retest(flagged, base, collapsed(rerun_of(base, cells)), 0.02, 0.01)
    assert not final.ok
    point = final.confirmation[(final.confirmation["kind"] == "point") &
                               final.confirmation["what"].str.contains("textures frozen 0 4")]
    assert (point["outcome"] == "confirmed").all() and len(point)
    assert any("of gain dropped" in p for p in final.problems), final.problems
    assert "## transferbench gate: FAIL" in render_markdown(final, Path("b"), Path("n"))


def test_a_rerun_without_the_cells_is_untestable_not_a_pass(base, flagged):
    final = retest(flagged, base, base.iloc[:0], 0.02, 0.01)
    assert not final.ok and (final.confirmation["outcome"] == "untestable").all()
    assert any("did not rerun" in u for u in final.untestable), final.untestable


def test_failed_cells_of_the_rerun_fail_the_gate(base, flagged):
    cells = covered_cells(collapsed(base), flagged.tests)
    rerun = rerun_of(base, cells)
    rerun.loc[rerun.index[0], "status"] = "failed"
    final = retest(flagged, base, rerun, 0.02, 0.01)
    assert any("confirmation rerun not recorded ok" in p for p in final.problems), final.problems


def test_confirm_needs_the_study_that_made_the_results(tmp_path, capsys):
    new = tmp_path / "new"
    new.mkdir()
    collapsed(read_runs(SMOKE)).to_csv(new / "runs.csv", index=False)
    assert main(["compare", str(SMOKE), str(new), "--confirm"]) == 2
    err = capsys.readouterr().err
    assert "--confirm" in err and "study.resolved.yaml" in err and len(err.strip().splitlines()) == 1


def test_rerun_cells_without_valid_accuracies_are_reported_not_dropped(base, flagged):
    cells = covered_cells(collapsed(base), flagged.tests)
    rerun = collapsed(rerun_of(base, cells))
    rerun.loc[rerun.index[:2], "test_acc"] = np.nan
    final = retest(flagged, base, rerun, 0.02, 0.01)
    assert not final.ok and any("confirmation rerun" in u for u in final.untestable), final.untestable


def test_a_rerun_whose_every_cell_failed_is_read_and_fails_the_gate(tmp_path, base, flagged):
    cells = covered_cells(collapsed(base), flagged.tests)
    rerun = rerun_of(base, cells).assign(status="failed", test_acc=np.nan, val_acc=np.nan)
    (tmp_path / "confirm").mkdir()
    rerun.to_csv(tmp_path / "confirm" / "runs.csv", index=False)
    with pytest.raises(Exception, match="no cell recorded ok"):
        read_runs(tmp_path / "confirm")  # as a base or a new run: refused
    final = retest(flagged, base, read_runs(tmp_path / "confirm", require_valid=False), 0.02, 0.01)
    assert any("confirmation rerun not recorded ok" in p for p in final.problems), final.problems
    assert (final.confirmation["outcome"] == "untestable").all()


def test_confirm_refuses_a_results_folder_that_holds_a_link(tmp_path, capsys):
    """The rerun writes into NEW/confirm/: a link planted there (or NEW itself a link) would take the writes
    elsewhere, so it is refused before anything trains, as `transferbench study` refuses its folder."""
    new = tmp_path / "new"
    new.mkdir()
    collapsed(read_runs(SMOKE)).to_csv(new / "runs.csv", index=False)
    (new / "study.resolved.yaml").write_text((SMOKE / "study.resolved.yaml").read_text())
    (tmp_path / "elsewhere").mkdir()
    (new / "confirm").symlink_to(tmp_path / "elsewhere")
    assert main(["compare", str(SMOKE), str(new), "--confirm", "--no-progress"]) == 2
    printed = capsys.readouterr()
    errors = [line for line in printed.err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "symbolic link" in errors[0]
    assert "REGRESSION" in printed.out and "the first pass, unconfirmed" in printed.out  # the first pass is not lost
    assert not any((tmp_path / "elsewhere").iterdir())
