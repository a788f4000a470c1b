"""The regression gate: passes on the committed smoke baseline, fails on a degraded copy of it."""

import shutil
from pathlib import Path

import pandas as pd
import pytest

from transferbench.cli import main
from transferbench.compare import compare
from transferbench.study import expand, load_study

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


def test_gate_fails_when_gains_drop_beyond_the_ci(degraded, capsys):
    gains = pd.read_csv(degraded / "gains.csv")
    gains["gain"] -= 0.30
    gains["transfer_mean"] -= 0.30
    gains.to_csv(degraded / "gains.csv", index=False)
    assert main(["compare", str(BASELINE), str(degraded)]) == 1
    assert "lost gain beyond the base CI" in capsys.readouterr().out


def test_gate_fails_on_missing_or_failed_cells(degraded):
    runs = pd.read_csv(degraded / "runs.csv", dtype={"error": object})
    runs.iloc[1:].to_csv(degraded / "runs.csv", index=False)
    assert any("missing" in p for p in compare(BASELINE, degraded).problems)
    runs.loc[0, ["status", "error"]] = ["failed", "Diverged: loss became nan"]
    runs.to_csv(degraded / "runs.csv", index=False)
    assert any("failed" in p for p in compare(BASELINE, degraded).problems)


def test_gate_fails_when_the_harness_gets_much_slower(degraded):
    runs = pd.read_csv(degraded / "runs.csv")
    runs["images_per_second"] /= 3
    runs.to_csv(degraded / "runs.csv", index=False)
    assert any("slower" in p for p in compare(BASELINE, degraded).problems)


def test_small_noise_inside_the_ci_is_not_a_regression(degraded):
    gains = pd.read_csv(degraded / "gains.csv")
    gains["gain"] = gains["gain"] - 0.005
    gains.to_csv(degraded / "gains.csv", index=False)
    assert compare(BASELINE, degraded).ok
