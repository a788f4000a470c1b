"""The regression gate on committed seed-level records: passes on the baseline itself and on noise, fails on
degraded copies. (Real reruns, with planted regressions, are in test_gate_calibration.py.)"""

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from transferbench.analysis.compare import compare, compare_runs, read_runs, welch_drop, welch_interval
from transferbench.cli import main
from transferbench.core.study import expand, load_study

ROOT = Path(__file__).parents[1]
BASELINE = ROOT / "results" / "baselines" / "smoke"


def test_baseline_is_committed_and_matches_the_smoke_study():
    runs = pd.read_csv(BASELINE / "runs.csv")
    cells = {c.cell_id for c in expand(load_study(ROOT / "studies" / "smoke.yaml"))}
    assert set(runs["cell_id"]) == cells, "baseline is stale: rerun smoke and copy it (see README)"


def test_gate_passes_on_the_baseline_itself(capsys):
    assert main(["compare", str(BASELINE), str(BASELINE)]) == 0
    assert "no regression" in capsys.readouterr().out


@pytest.fixture
def degraded(tmp_path):
    out = tmp_path / "new"
    shutil.copytree(BASELINE, out)
    return out


def edit_runs(folder: Path, edit) -> None:
    """edit(runs) changes the table in place, or returns the new one."""
    runs = pd.read_csv(folder / "runs.csv", dtype={"error": object})
    edited = edit(runs)
    (runs if edited is None else edited).to_csv(folder / "runs.csv", index=False)


def test_gate_fails_when_transfer_accuracy_drops_everywhere(degraded, capsys):
    edit_runs(degraded, lambda r: r.__setitem__("test_acc", r["test_acc"] - 0.30 * (r["arm"] == "transfer")))
    assert main(["compare", str(BASELINE), str(degraded)]) == 1
    assert "test(s) of gain dropped beyond the margin" in capsys.readouterr().out


def test_gate_fails_when_one_target_loses_its_gain(degraded):
    def drop(r):
        hit = (r["arm"] == "transfer") & (r["target"] == "digits")
        r.loc[hit, "test_acc"] = r.loc[hit, "test_acc"] - 0.15

    edit_runs(degraded, drop)
    problems = compare(BASELINE, degraded).problems
    assert any("target test(s) of gain dropped" in p and "digits" in p for p in problems), problems


def test_gate_fails_on_missing_points_or_failed_cells(degraded):
    first = pd.read_csv(BASELINE / "runs.csv").iloc[0]
    same_point = ["backbone", "target", "arm", "n_per_class", "schedule"]
    edit_runs(degraded, lambda r: r[~(r[same_point] == first[same_point]).all(axis=1)])
    assert any("missing" in p for p in compare(BASELINE, degraded).problems)
    shutil.copy(BASELINE / "runs.csv", degraded / "runs.csv")
    edit_runs(degraded, lambda r: r.__setitem__("status", np.where(r.index == 0, "failed", r["status"])))
    assert any("failed" in p for p in compare(BASELINE, degraded).problems)


def test_gate_fails_when_scratch_breaks_although_the_gain_grows(degraded):
    edit_runs(degraded, lambda r: r.__setitem__("test_acc", r["test_acc"] - 0.2 * (r["arm"] == "scratch")))
    problems = compare(BASELINE, degraded).problems
    assert any("of scratch accuracy dropped" in p for p in problems), problems
    assert not any("of gain dropped" in p for p in problems)


def test_gate_fails_when_the_structure_changes(degraded):
    def unfreeze(r):
        r.loc[r["frozen_depth"].astype(str) == "all", "trainable_params"] = 3_000_000

    edit_runs(degraded, unfreeze)
    assert any("trainable_params changed" in p for p in compare(BASELINE, degraded).problems)


def test_gate_fails_when_the_harness_gets_much_slower(degraded):
    edit_runs(degraded, lambda r: r.__setitem__("images_per_second", r["images_per_second"] / 3))
    assert any("slower" in p for p in compare(BASELINE, degraded).problems)


def with_reference(folder: Path, images_per_second: float) -> None:
    edit_runs(folder, lambda r: r.__setitem__("reference_images_per_second", images_per_second))


def test_speed_is_judged_against_the_reference_step_of_each_job(tmp_path, degraded):
    """A host three times slower runs the cells and its reference step three times slower: no regression, where the
    bare images/s would fail. The harness three times slower on a host of the same speed fails."""
    base = tmp_path / "base"
    shutil.copytree(BASELINE, base)
    with_reference(base, 150.0)
    edit_runs(degraded, lambda r: r.__setitem__("images_per_second", r["images_per_second"] / 3))
    with_reference(degraded, float("nan"))
    problems = compare(base, degraded).problems  # the new side records no reference step
    assert any("slower" in p and "no comparable reference" in p for p in problems), problems
    with_reference(degraded, 50.0)
    slow_host = compare(base, degraded)
    assert slow_host.ok, slow_host.problems
    assert slow_host.speeds["within_job"].to_numpy() == pytest.approx(1.0)
    assert slow_host.speeds["images"].to_numpy() == pytest.approx(1 / 3, rel=0.05)
    # against a base of the same host class, images/s count too: a slowdown of the whole process (the reference
    # step included) cancels from the ratio
    b_runs, n_runs = read_runs(base), read_runs(degraded)
    assert any("against the same host class" in p for p in compare_runs(b_runs, n_runs, "b", same_host=True).problems)
    with_reference(degraded, 150.0)
    problems = compare(base, degraded).problems
    assert any("slower" in p and "x0.33 as a ratio to the bare PyTorch step" in p for p in problems), problems


@pytest.mark.parametrize("ratio, slower", [(0.8, False), (0.5, True)])
def test_the_within_job_floor_passes_host_conditions_and_fails_a_harness_twice_as_slow(ratio, slower, tmp_path,
                                                                                     degraded):
    """0.8: the worst within-job ratio of an unchanged smoke run over the host conditions measured (one worker of
    two threads against two of one); 0.5: the harness twice as slow on the same host (docs/gate.md)."""
    base = tmp_path / "base"
    shutil.copytree(BASELINE, base)
    with_reference(base, 130.0)
    with_reference(degraded, 130.0)
    edit_runs(degraded, lambda r: r.__setitem__("images_per_second", r["images_per_second"] * ratio))
    problems = compare(base, degraded).problems
    assert any("as a ratio to the bare PyTorch step" in p and "(below 70%)" in p for p in problems) == slower, problems


def test_noise_of_the_seeds_size_is_not_a_regression(degraded):
    rng = np.random.default_rng(0)
    edit_runs(degraded, lambda r: r.__setitem__("test_acc", r["test_acc"] + rng.normal(0, 0.02, len(r))))
    c = compare(BASELINE, degraded)
    assert c.ok, c.problems


def test_welch_drop_is_one_sided_with_a_margin():
    base, same = np.array([0.50, 0.52, 0.48]), np.array([0.51, 0.49, 0.50])
    assert welch_drop(base, same, 0.02) > 0.5
    assert welch_drop(base, same - 0.20, 0.02) < 0.01
    assert welch_drop(base, same + 0.20, 0.02) > 0.99  # an improvement is not a regression
    assert np.isnan(welch_drop(base[:1], same, 0.02))


def test_welch_drop_without_spread_is_decided_by_the_means():
    """Seeds all alike on both sides (a probe at chance on every seed): an unchanged rerun is no regression, a drop
    beyond the margin is one for certain, a drop within it is not."""
    flat = np.full(3, 0.5)
    assert welch_drop(flat, flat, 0.02) == 1.0
    assert welch_drop(flat, flat - 0.05, 0.02) == 0.0
    assert welch_drop(flat, flat - 0.01, 0.02) == 1.0


def test_compare_needs_result_folders(tmp_path, capsys):
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_welch_interval_by_hand():
    """base 0, 1, 2 and new 1, 2, 3: difference 1, SE sqrt(1/3 + 1/3), Welch df 4, t(0.975, 4) = 2.776."""
    lo, hi = welch_interval(np.array([0.0, 1, 2]), np.array([1.0, 2, 3]))
    half = 2.7764451 * np.sqrt(2 / 3)
    assert lo == pytest.approx(1 - half, rel=1e-6) and hi == pytest.approx(1 + half, rel=1e-6)
    assert welch_interval(np.full(3, 0.5), np.full(3, 0.4)) == pytest.approx((-0.1, -0.1))


def test_markdown_summary_passes_on_the_baseline_and_names_what_fails(degraded, capsys):
    assert main(["compare", str(BASELINE), str(BASELINE), "--format", "md"]) == 0
    same = capsys.readouterr().out
    assert same.startswith("## transferbench gate: PASS") and "### Verdict flips (gains.csv)\n\nnone" in same
    assert "| transfer |" in same and "1.00 |" in same and "<details><summary>All" in same
    edit_runs(degraded, lambda r: r.__setitem__("test_acc", r["test_acc"] - 0.30 * (r["arm"] == "transfer")))
    gains = pd.read_csv(degraded / "gains.csv")
    gains.loc[0, "verdict"] = "negative" if gains.loc[0, "verdict"] != "negative" else "positive"
    gains.to_csv(degraded / "gains.csv", index=False)
    assert main(["compare", str(BASELINE), str(degraded), "--format", "md"]) == 1
    md = capsys.readouterr().out
    assert md.startswith("## transferbench gate: FAIL") and "- **regression**: " in md
    failing = md.split("### Failing checks")[1].split("###")[0]
    assert "| point | gain |" in failing and "-30.0" in failing  # the drop, then its interval and q
    flips = md.split("### Verdict flips (gains.csv)")[1].split("###")[0]
    assert flips.count("\n| ") == 2  # the header and the one flipped point


def test_the_reference_step_leaves_the_process_as_it_found_it():
    """Cells trained after it in the same process (backend: sequential) must draw what they would have drawn."""
    import torch

    from transferbench.sweep.reference import measure

    threads = torch.get_num_threads()
    torch.manual_seed(5)
    expected = torch.rand(4)
    torch.manual_seed(5)
    measured = measure(1)
    assert torch.equal(torch.rand(4), expected) and torch.get_num_threads() == threads
    assert measured["images_per_second"] > 0 and measured["threads"] == 1


def test_the_reference_step_runs_in_every_worker_at_once(monkeypatch):
    """Under the cells' load: two processes time their steps at the same time (hosts whose two vCPUs are one core's
    hyperthreads slow both, cells and reference alike); the job's reference is their median."""
    from transferbench.sweep import reference

    runs = reference.at_once(2, 1)
    assert len({r["pid"] for r in runs}) == 2  # two processes
    assert max(r["began"] for r in runs) < min(r["ended"] for r in runs)  # timing at the same time
    assert all(r["images_per_second"] > 0 and r["threads"] == 1 for r in runs)
    speeds = []
    monkeypatch.setattr(reference, "measure", lambda threads, barrier=None: speeds.append(threads) or dict(
        images_per_second=100.0 * len(speeds)))
    assert reference.under_load(1, 2) == 100.0 and speeds == [2]  # one worker: measured here, on its threads
    monkeypatch.setattr(reference, "at_once", lambda workers, threads: [dict(images_per_second=v) for v in (3, 1, 2)])
    assert reference.under_load(3, 1) == 2  # the median


def test_a_reference_process_that_dies_fails_the_measurement_at_once():
    """Not after the whole time-out: a process killed or crashed in start-up never sends its result."""
    import queue
    import time
    from types import SimpleNamespace

    from transferbench.sweep import reference

    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match=r"exit codes \[-9\]"):
        reference._collect(queue.Queue(), [SimpleNamespace(exitcode=-9), SimpleNamespace(exitcode=None)], t0 + 100)
    assert time.monotonic() - t0 < 10


def test_an_implausible_reference_step_cannot_hide_a_slowdown(tmp_path, degraded):
    """References further apart than two hosts of a kind are (a step of 1e-6 images/s, or 1e308) are not used: the
    gate judges images/s, and the harness ten times slower fails."""
    base = tmp_path / "base"
    shutil.copytree(BASELINE, base)
    with_reference(base, 150.0)
    edit_runs(degraded, lambda r: r.__setitem__("images_per_second", r["images_per_second"] / 10))
    for new_reference in (1e-6, 1e308):
        with_reference(degraded, new_reference)
        result = compare(base, degraded)
        assert result.speeds["within_job"].isna().all()
        assert any("slower" in p and "no comparable reference" in p for p in result.problems), result.problems
