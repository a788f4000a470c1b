"""Golden tests (DomainBed-style) on a small committed set of records: 56 cells of the smoke study (lite0 on digits:
transfer, scratch and the pixel baselines, two sizes, two schedules, four seeds). The tables and the analysis built
from them must equal the committed golden CSVs, so an analysis change that moves a number shows up here without
retraining anything. After an intended change: UPDATE_GOLDEN=1 pytest tests/test_golden.py, and say why in the
commit."""

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from transferbench.analysis import gains as analysis
from transferbench.analysis.comparable import comparable
from transferbench.sweep.store import curves_table, read_records, runs_table

FIXTURES = Path(__file__).parent / "fixtures"
GOLDEN = FIXTURES / "golden"


@pytest.fixture(scope="module")
def runs():
    records = list(read_records(FIXTURES / "records").values())
    assert len(records) == 56 and {r["arm"] for r in records} == {"transfer", "scratch", "pixels"}
    return runs_table(records)


def derived(runs: pd.DataFrame) -> dict[str, pd.DataFrame]:
    return {"gains": analysis.negative_transfer(analysis.gains(runs, 0.95, 0.05, 0.01)),
            "comparable": comparable(runs, 0.95, 0.05, 0.01),
            "fairness": analysis.fairness(runs),
            "mean_gain_by_size": analysis.mean_gain(runs, ["n_per_class"]),
            "schedules": analysis.schedule_effect(runs).reset_index(),
            "runs": runs[["cell_id", "arm", "frozen_depth", "n_per_class", "schedule", "seed", "val_acc", "test_acc",
                          "converged", "lr_chosen"]]}


@pytest.mark.parametrize("name", ["gains", "comparable", "fairness", "mean_gain_by_size", "schedules", "runs"])
def test_table_equals_its_golden_copy(runs, name):
    table = derived(runs)[name]
    path = GOLDEN / f"{name}.csv"
    if os.environ.get("UPDATE_GOLDEN"):
        GOLDEN.mkdir(exist_ok=True)
        table.to_csv(path, index=False)
        pytest.skip("golden copy rewritten")
    golden = pd.read_csv(path)
    fresh = pd.read_csv(__import__("io").StringIO(table.to_csv(index=False)))  # the same CSV round trip
    assert list(fresh.columns) == list(golden.columns) and len(fresh) == len(golden)
    for col in golden.columns:
        if pd.api.types.is_numeric_dtype(golden[col]) and not pd.api.types.is_bool_dtype(golden[col]):
            np.testing.assert_allclose(fresh[col].to_numpy(float), golden[col].to_numpy(float), rtol=1e-9,
                                       atol=1e-12, equal_nan=True, err_msg=f"{name}.{col}")
        else:
            assert fresh[col].fillna("").astype(str).tolist() == golden[col].fillna("").astype(str).tolist(), col


def test_the_records_are_stored_nested_and_checked():
    import json

    raw = json.loads(next((FIXTURES / "records").glob("*.json")).read_text())
    assert set(raw) == {"study", "cell_id", "cell", "result", "provenance", "checksum"}


def test_curves_cover_every_network_cell(runs):
    curves = curves_table(list(read_records(FIXTURES / "records").values()))
    networks = runs[(runs["arm"] != "pixels") & (runs["schedule"] != "lbfgs")]
    assert set(networks["cell_id"]) <= set(curves["cell_id"])
