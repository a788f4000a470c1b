"""The smoke study end to end, through the CLI a user runs: every axis, real data, real weights (two of its four
seeds, to keep `make test` short; CI runs the whole smoke study after the tests)."""

import json
from pathlib import Path

import pandas as pd
import pytest

from transferbench.analysis.compare import read_runs
from transferbench.cli import main
from transferbench.sweep.store import RUN_COLUMNS

pytestmark = pytest.mark.slow  # end to end through the CLI: `make test-slow` (and CI)

STUDIES = Path(__file__).parents[1] / "studies"
SEEDS = "grid.seed=[0,1]"


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("results")
    assert main(["study", str(STUDIES / "smoke.yaml"), SEEDS, "--results", str(out), "--no-progress"]) == 0
    return out / "smoke"


def test_runs_csv_has_one_row_per_cell_and_the_column_floor(smoke):
    runs = pd.read_csv(smoke / "runs.csv")
    assert len(runs) == 96 and runs["cell_id"].is_unique
    assert set(RUN_COLUMNS) <= set(runs.columns)
    assert (runs["status"] == "ok").all()
    assert set(runs["arm"]) == {"transfer", "scratch", "pixels"}
    probe = runs[runs["frozen_depth"] == "all"]
    assert (probe["frozen_fraction"] == 1).all() and (probe["frozen_groups"] == 8).all()
    assert (probe["schedule"] == "lbfgs").all() and probe["converged"].all()
    assert runs["test_acc"].between(0, 1).all()
    networks = runs[runs["arm"] != "pixels"]
    assert networks["images_seen"].gt(0).all()
    for col in ("steps_taken", "best_step", "early_stopped", "train_acc", "collapsed", "converged"):
        assert runs[col].notna().all(), col  # the convergence check of every record
    for col in ("torch_version", "timm_version", "device", "host", "started", "ended"):
        assert runs[col].notna().all()


def test_curves_are_long_format_per_step(smoke):
    curves = pd.read_csv(smoke / "curves.csv")
    assert list(curves.columns[:6]) == ["cell_id", "epoch", "step", "split", "metric", "value"]
    sgd = pd.read_csv(smoke / "runs.csv").query("arm != 'pixels' and schedule != 'lbfgs'")
    val = curves[(curves["split"] == "val") & (curves["metric"] == "acc")].groupby("cell_id")["step"].apply(list)
    assert set(val.index) == set(sgd["cell_id"])
    assert all(steps == [10, 20, 30][:len(steps)] and steps for steps in val)  # validation every 10 steps
    train = curves[(curves["split"] == "train") & (curves["metric"] == "loss")]
    assert (train.groupby("cell_id")["images_seen"].max() > 0).all()


def test_gains_pair_every_transfer_point_with_scratch(smoke):
    gains = pd.read_csv(smoke / "gains.csv")
    assert len(gains) == 2 * 2 * 2 * 2  # backbones x targets x depths x sizes: schedules are chosen per arm
    assert (gains["n_seeds"] == 2).all()
    assert (gains["ci_low"] <= gains["gain"]).all() and (gains["gain"] <= gains["ci_high"]).all()
    assert set(gains["verdict"]) <= {"positive", "negative", "inconclusive"}
    assert gains["pixels_best"].between(0, 1).all() and gains["q"].notna().all()
    runs = pd.read_csv(smoke / "runs.csv")
    row = gains.iloc[0]
    tr = runs[(runs.arm == "transfer") & (runs.backbone == row.backbone) & (runs.target == row.target)
              & (runs.frozen_depth.astype(str) == str(row.frozen_depth)) & (runs.n_per_class == row.n_per_class)
              & (runs.schedule == row.transfer_schedule)]
    assert row.transfer_mean == pytest.approx(tr["test_acc"].mean())


def test_figures_and_report(smoke):
    for name in ("accuracy_vs_size", "gain_heatmap", "gain_forest", "fairness", "gain_vs_fd"):
        assert (smoke / "figures" / f"{name}.png").stat().st_size > 10_000
        assert (smoke / "figures" / f"{name}.svg").exists()
    report = (smoke / "report.md").read_text()
    sections = ["## The question", "## The study as run", "## Is the comparison fair?", "## Headline", "## Findings"]
    assert [report.index(s) for s in sections] == sorted(report.index(s) for s in sections)
    assert "textures, 2 per class" in report and " pp [" in report and "converged %" in report
    assert "seeds 0, 1; 96 cells" in report  # the resolved grid (seeds overridden), not the file's prose
    assert "\n> The quick stand-in for domain_gap" in report  # the study file's description, quoted as the question
    assert report.index("![fairness]") < report.index("## Headline")


def test_every_record_carries_its_jobs_reference_step(smoke):
    """The gate's speed check divides by it (analysis.compare.speed_table); the timing block says what it was."""
    reference = read_runs(smoke)["reference_images_per_second"]
    assert reference.nunique() == 1 and reference.iloc[0] > 0  # one job trained every cell
    assert f"{reference.iloc[0]:.0f} images/s" in (smoke / "timing.txt").read_text()


def test_rerun_skips_every_finished_cell(smoke, capsys):
    before = {p.name: p.stat().st_mtime_ns for p in (smoke / "records").glob("*.json")}
    timing = (smoke / "timing.txt").read_text()
    assert main(["study", str(STUDIES / "smoke.yaml"), SEEDS, "--results", str(smoke.parent), "--no-progress"]) == 0
    assert (smoke / "timing.txt").read_text() == timing, "a rerun with nothing to do replaced the timing block"
    assert f"nothing to do: all {len(before)} cells already have records" in capsys.readouterr().out
    assert before == {p.name: p.stat().st_mtime_ns for p in (smoke / "records").glob("*.json")}


def test_report_is_rebuilt_from_records_alone(smoke):
    (smoke / "report.md").unlink()
    (smoke / "gains.csv").unlink()
    assert main(["report", "smoke", "--results", str(smoke.parent)]) == 0
    assert (smoke / "report.md").exists() and (smoke / "gains.csv").exists()


def test_every_record_names_device_and_versions(smoke):
    rec = json.loads(next((smoke / "records").glob("*.json")).read_text())
    assert set(rec) == {"study", "cell_id", "cell", "result", "provenance", "checksum"}
    assert {"device", "seed", "lrs"} & set(rec["cell"]) and "test_acc" in rec["result"]
    assert {"device_used", "torch_version", "timm_version", "transferbench_version", "threads", "git_commit",
            "git_dirty"} <= set(rec["provenance"])
    from transferbench.core.study import Cell
    assert Cell(**rec["cell"]).cell_id == rec["cell_id"]  # the config nested as written is what the id hashes


def test_domain_measures_come_from_the_disk_cache(smoke, monkeypatch):
    from transferbench.core.study import load_saved_study
    from transferbench.measures import domains

    study = load_saved_study(smoke)
    calls, real = [], domains._measure_target
    monkeypatch.setattr(domains, "_measure_target", lambda *a, **k: calls.append(1) or real(*a, **k))
    measured, _ = domains.domain_tables(study)
    assert calls == [], "an unchanged study measured its domains again"
    written = pd.read_csv(smoke / "domains.csv")
    assert measured["fd"].to_numpy() == pytest.approx(written["fd"].to_numpy())
    more_seeds = study.model_copy(update={"grid": study.grid.model_copy(update={"seed": [0, 1, 2]})})
    domains.domain_tables(more_seeds)
    assert len(calls) == 4  # 2 backbones x 2 targets: their k-shot estimators depend on the seeds


def test_skip_domains_builds_the_report_without_them(smoke):
    # last in this file: it rebuilds the shared report without domain measures
    assert main(["study", str(STUDIES / "smoke.yaml"), SEEDS, "--results", str(smoke.parent), "--no-progress",
                 "--skip-domains"]) == 0
    report = (smoke / "report.md").read_text()
    assert "domain measures skipped (--skip-domains)" in report and "near to far by the study file" in report
    assert not (smoke / "figures" / "gain_vs_fd.png").exists()  # no stale figure from the build before


def test_which_layers_runs_end_to_end_and_reports_its_arms(tmp_path):
    """The which_layers study, cut to two conditions and a few steps: every arm trains through the CLI, and the
    report has its section, its figure and its claims table."""
    args = ["study", str(STUDIES / "which_layers.yaml"), "--results", str(tmp_path), "--no-progress",
            "targets=[{dataset: textures}, {dataset: textures, shift: contrast, severity: 5}]", "grid.seed=[0,1]",
            "grid.n_per_class=[4]", "train.steps=6", "train.eval_every=3", "train.min_steps=3"]
    assert main(args) == 0
    out = tmp_path / "which_layers"
    runs = pd.read_csv(out / "runs.csv")
    assert (runs["status"] == "ok").all()
    assert set(runs.loc[runs["arm"] == "transfer", "tuning"]) == {"frozen 0", "groups 0", "groups 7", "LP-FT",
                                                                   "LLRD 0.75", "probe (all)"}
    text = (out / "report.md").read_text()
    assert "## Which layers to train" in text and "figures/arm_differences.png" in text
    claims = pd.read_csv(out / "claims.csv")
    assert "groups 0 - frozen 0" in set(claims["contrast"]) and claims["ci_low"].notna().all()
