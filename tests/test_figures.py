"""Every registered figure, drawn from the committed reference tables (no training): no two labels overlap, every
figure fits a page width, colours are one per target and per arm across figures, and the report's prose follows
its guards (measured order, no ranking from too few targets, intervals in every finding)."""

from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import pytest

from transferbench.analysis import predictors, tables
from transferbench.core.study import load_saved_study
from transferbench.report import document as report
from transferbench.report import plots
from transferbench.sweep.store import curves_table

BASELINES = Path(__file__).parents[1] / "results" / "baselines"
STUDIES = ("domain_gap", "smoke", "which_layers")


@pytest.fixture(scope="module", params=STUDIES)
def reference(request):
    """(study, tables, style) of one committed baseline, rebuilt from its CSVs."""
    folder = BASELINES / request.param
    study = load_saved_study(folder)
    t = tables.read_tables(study, folder)
    order, by = predictors.distance_order([c.condition for c in study.targets], t.domains)
    return study, t, plots.make_style(t.runs, order, by)


@pytest.mark.parametrize("name", list(plots.FIGURES))
def test_figure_has_no_overlapping_labels_and_fits_a_page(reference, name):
    study, t, style = reference
    fig = plots.FIGURES[name](t, style)
    if fig is None:
        absent = {"transfer_matrix": t.selected["weights"].nunique() == 1,  # only these may be absent, and only
                  "arm_differences": t.arm_differences.empty,  # where the study has nothing to draw in them
                  "dial": t.dial.empty}  # fewer than 3 base datasets measured
        assert absent.get(name)
        return
    try:
        assert plots.overlapping_labels(fig) == []
        assert plots.width_inches(fig) <= plots.PAGE_WIDTH + 0.05
    finally:
        plt.close(fig)


def test_the_overlap_check_can_fail():
    fig, ax = plt.subplots(figsize=(2, 2))
    ax.set_xticks(range(12), [f"a long tick label {i}" for i in range(12)])
    try:
        assert plots.overlapping_labels(fig)
        assert plots.width_inches(fig) > 2  # the labels spill past the 2-inch figure
    finally:
        plt.close(fig)


def test_one_colour_per_target_and_per_arm():
    study = load_saved_study(BASELINES / "domain_gap")
    t = tables.read_tables(study, BASELINES / "domain_gap")
    targets = [c.condition for c in study.targets]
    style = plots.make_style(t.runs, targets, "the study file")
    assert list(style.targets) == targets and len(set(style.targets.values())) == len(targets)
    assert len({str(c) for c in style.arms.values()}) == len(style.arms)
    assert style.arm_order[:3] == ["frozen 0", "frozen 6", "probe (all)"] and "scratch" in style.arms
    fewer = plots.make_style(t.runs[t.runs["frozen_depth"].astype(str) != "6"], targets, "the study file")
    assert fewer.arms["scratch"] == style.arms["scratch"] and fewer.arms["frozen 0"] == style.arms["frozen 0"]


def test_findings_carry_intervals_and_follow_measured_distance():
    study = load_saved_study(BASELINES / "domain_gap")
    t = tables.read_tables(study, BASELINES / "domain_gap")
    order, by = predictors.distance_order([c.condition for c in study.targets], t.domains)
    assert by.startswith("measured") and order != [c.condition for c in study.targets]  # FD reorders this study
    lines = report.findings(study, t)
    assert sum(" pp [" in line for line in lines) >= 2
    assert f"Nearest target as measured: {order[0]}" in lines[2] and f"farthest: {order[-1]}" in lines[2]
    assert "examples per class" in lines[1] and "1 examples" not in " ".join(lines)


def test_no_estimator_is_ranked_from_fewer_than_four_targets():
    study = load_saved_study(BASELINES / "smoke")
    t = tables.read_tables(study, BASELINES / "smoke")
    assert t.selected["target"].nunique() < predictors.MIN_TARGETS_TO_RANK
    text = " ".join(report.findings(study, t) + report.failure_section(study, t))
    assert "Best predictor" not in text and "No estimator is ranked" in text and "+nan" not in text


def test_study_as_run_is_generated_from_the_resolved_config():
    study = load_saved_study(BASELINES / "smoke")
    t = tables.read_tables(study, BASELINES / "smoke")
    changed = study.model_copy(update={"train": study.train.model_copy(update={"image_size": 48, "steps": 77})})
    text = "\n".join(report.study_as_run(changed, t, "wall time: 120.0 s for 192 cells", "the study file", ["a"]))
    assert "images 48 px" in text and "77 optimizer steps per transfer cell" in text
    assert "2.0 min for 192 cells" in text and "torch 2." in text and "device: cpu" in text


def test_per_class_counts_in_words():
    assert report.per_class(1) == "1 example per class" and report.per_class(8) == "8 examples per class"


@pytest.mark.parametrize("search", ["halving", "first_seed", "grid"])
def test_study_as_run_names_every_lr_search(search):
    from transferbench.core.study import Train

    assert set(Train.model_fields["lr_search"].annotation.__args__) == {"halving", "first_seed", "grid"}
    study = load_saved_study(BASELINES / "smoke")
    t = tables.read_tables(study, BASELINES / "smoke")
    changed = study.model_copy(update={"train": study.train.model_copy(update={"lr_search": search})})
    text = "\n".join(report.study_as_run(changed, t, None, "the study file", ["a"]))
    assert {"halving": "inside each cell", "first_seed": "first seed's cell", "grid": "a full cell"}[search] in text


def test_a_report_from_pixel_records_alone_draws_what_it_can(tmp_path):
    """A run stopped before any network cell finished (as a timed-out GPU run was): the pixel baselines' records
    alone still give tables, figures and a report, not a crash."""
    study = load_saved_study(BASELINES / "smoke")
    runs = tables.read_tables(study, BASELINES / "smoke").runs
    t = tables.derive(study, runs[runs["arm"] == "pixels"], curves_table([]), pd.DataFrame(), None)
    order, by = predictors.distance_order([c.condition for c in study.targets], t.domains)
    drawn = plots.draw_all(t, plots.make_style(t.runs, order, by), tmp_path)
    assert t.gains.empty and all(p.exists() for p in drawn)


def test_every_section_opens_its_registered_heading(reference):
    """A report section's registered heading is the one it writes (the registry cannot drift from the text), and
    every figure closes a registered section (a misspelt one would silently move the figure)."""
    study, t, _ = reference
    page = report.Page(study, t, {}, None, True)
    written = [name for name, write in report.SECTIONS.items() if (lines := write(page))
               and report.SECTIONS.meta(name)["heading"] in lines]
    assert written == [name for name, write in report.SECTIONS.items() if write(page)]
    assert len(written) >= 7  # question, study, fairness, headline, findings, anchors, failure, gains, run at least
    assert {plots.FIGURES.meta(f)["section"] for f in plots.FIGURES} - {None} <= set(report.SECTIONS)
