"""`plan`'s projected wall time: a recorded run's wall time per unit of work, times the planned cells' work."""

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from transferbench.cli import main
from transferbench.core.errors import ConfigError
from transferbench.core.study import load_saved_study, load_study, study_path
from transferbench.sweep.costs import cell_work
from transferbench.sweep.planning import plan
from transferbench.sweep.projection import busy_seconds, duration, projection, recorded_rate

SMOKE = Path("results/baselines/smoke")


def own_time(factor: float = 1.0) -> str:
    """The committed smoke run's own cells' wall time (x factor): what it projects for its own study."""
    return duration(recorded_rate(SMOKE).wall_seconds * factor)


def test_busy_time_counts_overlaps_once_and_pauses_not_at_all():
    started = np.array([0.0, 5.0, 2.0, 100.0, 101.0, 112.0])
    ended = np.array([10.0, 12.0, 3.0, 110.0, 102.0, 115.0])
    assert busy_seconds(started, ended) == 12.0 + 15.0  # [0, 12], a pause, [100, 115] (2 s between cells count)
    assert busy_seconds(started, ended, pause=1.0) == 12.0 + 10.0 + 3.0
    assert busy_seconds(np.array([7.0]), np.array([7.0])) == 0.0


def _copy(tmp_path: Path) -> Path:
    folder = tmp_path / "smoke"
    folder.mkdir()
    for name in ("runs.csv", "study.resolved.yaml"):
        shutil.copy(SMOKE / name, folder / name)
    return folder


def test_a_recorded_run_projects_its_own_wall_time():
    """Planning the recorded study again at its own rate gives back the time its cells ran."""
    rate = recorded_rate(SMOKE)
    runs = pd.read_csv(SMOKE / "runs.csv")
    times = {c: pd.to_datetime(runs[c], utc=True) for c in ("started", "ended")}
    wall = (times["ended"].max() - times["started"].min()).total_seconds()
    assert rate.cells == (runs["status"] == "ok").sum() and rate.wall_seconds == pytest.approx(wall)
    cells = plan(load_saved_study(SMOKE))
    assert rate.seconds_per_work * sum(cell_work(c) for c in cells) == pytest.approx(wall)
    assert (rate.device, rate.image_size, rate.jobs) == ("cpu", 32, 2)


def test_a_pause_in_a_recorded_run_does_not_slow_its_rate(tmp_path):
    """The run resumed an hour later, from where no cell was running: the hour is not time its cells took."""
    folder = _copy(tmp_path)
    runs = pd.read_csv(folder / "runs.csv")
    start, end = (pd.to_datetime(runs[c], utc=True) for c in ("started", "ended"))
    cut = next(t for t in end.sort_values()  # a moment when no cell was running, with some still to come
               if not ((start <= t) & (end > t)).any() and (start > t).any())
    later = start > cut
    for c, t in (("started", start), ("ended", end)):
        runs[c] = t.where(~later, t + pd.Timedelta(hours=1)).map(lambda v: v.isoformat())
    runs.to_csv(folder / "runs.csv", index=False)
    gap = (start[later].min() - cut).total_seconds()
    assert recorded_rate(folder).wall_seconds == pytest.approx(recorded_rate(SMOKE).wall_seconds - gap)


def test_failed_cells_and_cells_of_another_plan_are_not_counted(tmp_path):
    folder = _copy(tmp_path)
    runs = pd.read_csv(folder / "runs.csv")
    runs.loc[0, "status"], runs.loc[1, "cell_id"] = "failed", "0123456789abcdef"
    runs.to_csv(folder / "runs.csv", index=False)
    assert recorded_rate(folder).cells == recorded_rate(SMOKE).cells - 2


@pytest.mark.parametrize("damage", ["no_times", "no_column", "no_file", "not_a_table"])
def test_a_reference_that_cannot_give_a_rate_is_refused_naming_it(tmp_path, damage, capsys):
    folder = _copy(tmp_path)
    runs = pd.read_csv(folder / "runs.csv")
    if damage == "no_times":
        runs.assign(started="yesterday").to_csv(folder / "runs.csv", index=False)
    elif damage == "no_column":
        runs.drop(columns="ended").to_csv(folder / "runs.csv", index=False)
    elif damage == "no_file":
        (folder / "runs.csv").unlink()
    else:
        (folder / "runs.csv").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigError) as e:
        recorded_rate(folder)
    assert e.value.field == "--reference"
    assert main(["plan", "smoke", "--reference", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --reference") and len(err.splitlines()) == 1


def test_only_runs_at_the_planned_image_size_and_worker_count_are_used(tmp_path):
    study = load_study(study_path("smoke"))
    cells = plan(study)
    root = tmp_path / "recorded"
    _copy(root) if root.mkdir() is None else None
    (root / "damaged").mkdir()  # a recorded run whose study cannot be read projects nothing, the others still do
    (root / "damaged" / "runs.csv").write_text("cell_id\n")
    (root / "damaged" / "study.resolved.yaml").write_text("name: [")
    line = projection(study, cells, root=root)
    assert line.startswith(f"projected wall time of the cells: {own_time()} ")
    assert "smoke (cpu, 32 px, 2 workers" in line
    wider = load_study(study_path("smoke"), ["train.image_size=64"])
    assert "no recorded run at 64 px with 2 workers" in projection(wider, plan(wider), root=root)
    more = load_study(study_path("smoke"), ["run.jobs=4"])
    assert "no recorded run at 32 px with 4 workers" in projection(more, plan(more), root=root)


def test_plan_prints_the_projection_and_names_its_source(capsys):
    assert main(["plan", "smoke", "--reference", str(SMOKE)]) == 0
    last = capsys.readouterr().out.splitlines()[-1]
    assert last.startswith("projected wall time of the cells:") and str(SMOKE) in last
    assert main(["plan", "smoke", "train.image_size=64", "--reference", str(SMOKE)]) == 0
    assert "it ran 32 px with 2 workers, this plan 64 px with 2" in capsys.readouterr().out
    assert main(["plan", "smoke", "backbones=[{model: tf_efficientnet_lite2, weights: imagenet}]", "--reference",
                 str(SMOKE)]) == 0
    assert "it trained none of ['tf_efficientnet_lite2']" in capsys.readouterr().out


def test_long_projections_read_in_hours():
    assert duration(90) == "1.5 min" and duration(1800) == "30 min" and duration(9000) == "2.5 h"


def _stretched(root: Path, name: str, factor: float, study_name: str | None = None) -> Path:
    """A copy of the smoke run under root/name whose cells took `factor` times as long (and, optionally, whose
    study has another name: the same cells)."""
    folder = root / name
    folder.mkdir(parents=True)
    runs = pd.read_csv(SMOKE / "runs.csv")
    start, end = (pd.to_datetime(runs[c], utc=True) for c in ("started", "ended"))
    zero = start.min()
    runs["started"] = (zero + (start - zero) * factor).map(lambda v: v.isoformat())
    runs["ended"] = (zero + (end - zero) * factor).map(lambda v: v.isoformat())
    runs["cell_seconds"] = runs["cell_seconds"] * factor
    runs.to_csv(folder / "runs.csv", index=False)
    text = (SMOKE / "study.resolved.yaml").read_text()
    (folder / "study.resolved.yaml").write_text(text.replace("name: smoke", f"name: {study_name}", 1)
                                                if study_name else text)
    return folder


def test_the_study_s_own_record_is_used_else_the_largest_with_the_others_as_the_range(tmp_path):
    root = tmp_path / "recorded"
    _stretched(root, "own", 1.0)
    _stretched(root, "larger", 4.0, study_name="other")
    study = load_study(study_path("smoke"))
    own = projection(study, plan(study), root=root)
    assert own.startswith(f"projected wall time of the cells: {own_time()} ") and "own (cpu" in own
    assert f"{own_time(4)} to {own_time(4)} at the rates of the other 1 matching" in own  # 4x the time of the cells
    renamed = load_study(study_path("smoke"), ["name=third"])
    largest = projection(renamed, plan(renamed), root=root)
    assert largest.startswith(f"projected wall time of the cells: {own_time(4)} ") and "larger (cpu" in largest
    assert f"{own_time()} to {own_time()} at the rates of the other 1" in largest
    only = projection(study, plan(study), root=root / "nothing")
    assert "no recorded run at 32 px with 2 workers" in only
    (root / "larger" / "runs.csv").unlink()
    assert "the only matching recorded run: no range" in projection(study, plan(study), root=root)


def test_the_worker_count_is_the_one_the_records_ran_with(tmp_path, capsys):
    """`study --jobs 1` is not in study.resolved.yaml: each record says how many workers ran."""
    folder = _copy(tmp_path)
    runs = pd.read_csv(folder / "runs.csv")
    runs.assign(jobs=1).to_csv(folder / "runs.csv", index=False)
    assert recorded_rate(folder).jobs == 1 and recorded_rate(SMOKE).jobs == 2  # older records: the study's
    study = load_study(study_path("smoke"))
    assert "no recorded run at 32 px with 2 workers" in projection(study, plan(study), root=tmp_path)
    assert main(["plan", "smoke", "--jobs", "1"]) == 0
    assert "no recorded run at 32 px with 1 workers" in capsys.readouterr().out  # the committed runs ran 2


def test_a_row_given_twice_counts_once(tmp_path):
    folder = _copy(tmp_path)
    runs = pd.read_csv(folder / "runs.csv")
    pd.concat([runs, runs.iloc[:5]]).to_csv(folder / "runs.csv", index=False)
    twice, once = recorded_rate(folder), recorded_rate(SMOKE)
    assert (twice.cells, twice.seconds_per_work) == (once.cells, once.seconds_per_work)


@pytest.mark.parametrize("damage", ["reversed", "not_a_time", "far_future", "beyond_pandas"])
def test_times_that_cannot_be_true_are_refused_not_left_out(tmp_path, damage, capsys):
    folder = _copy(tmp_path)
    runs = pd.read_csv(folder / "runs.csv")
    if damage == "reversed":
        runs[["started", "ended"]] = runs[["ended", "started"]].to_numpy()
    elif damage == "not_a_time":
        runs.loc[3, "started"] = "at noon"
    elif damage == "far_future":
        runs.loc[3, "ended"] = "2126-11-30T10:00:00+00:00"
    else:
        runs.loc[3, "ended"] = "9999-11-28T01:18:41+00:00"
    runs.to_csv(folder / "runs.csv", index=False)
    assert main(["plan", "smoke", "--reference", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --reference") and "have no true start and end" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("damage", ["unknown_dataset", "nul_byte"])
def test_a_reference_whose_study_cannot_be_planned_blames_the_reference(tmp_path, damage, capsys):
    folder = _copy(tmp_path)
    config = folder / "study.resolved.yaml"
    if damage == "unknown_dataset":
        config.write_text(config.read_text().replace("dataset: textures", "dataset: texturez", 1))
    else:
        config.write_bytes(config.read_bytes() + b"\x00")
    assert main(["plan", "smoke", "--reference", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --reference") and len(err.splitlines()) == 1
    study = load_study(study_path("smoke"))
    _stretched(tmp_path / "root", "smoke", 1.0)
    shutil.copytree(folder, tmp_path / "root" / "damaged")
    line = projection(study, plan(study), root=tmp_path / "root")  # left out, named; the good run still projects
    assert line.startswith(f"projected wall time of the cells: {own_time()} ")
    assert "1 damaged recorded run(s) left out" in line
