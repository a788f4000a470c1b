"""Crash safety, one writer, determinism and scale-out, on a tiny real study."""

import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

from transferbench.cli import main

TINY = """name: tiny
backbones: [{model: tf_efficientnet_lite0, weights: imagenet}]
targets: [{dataset: digits}]
grid: {frozen_depth: [0, all], n_per_class: [2], schedule: [constant], seed: [0, 1, 2]}
train: {epochs: 2, batch_size: 16}
run: {jobs: 1}
"""
VALUES = ["cell_id", "status", "val_acc", "test_acc", "test_loss", "n_train", "frozen_fraction"]


pytestmark = pytest.mark.slow  # studies through the CLI, killed and rerun: `make test-slow` (and CI)

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("study") / "tiny.yaml"
    path.write_text(TINY)
    return path


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory):
    """An uninterrupted run."""
    out = tmp_path_factory.mktemp("reference")
    assert main(["study", str(tiny), "--results", str(out), "--no-progress"]) == 0
    return pd.read_csv(out / "tiny" / "runs.csv")[VALUES].sort_values("cell_id", ignore_index=True)


def _cli(*args) -> list[str]:
    return [sys.executable, "-m", "transferbench.cli", *args]


def test_kill_9_mid_run_then_rerun_finishes_each_cell_exactly_once(tiny, reference, tmp_path):
    records = tmp_path / "tiny" / "records"
    proc = subprocess.Popen(_cli("study", str(tiny), "--results", str(tmp_path), "--no-progress"),
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(records.glob("*.json"))) < 2:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the runner and its workers, mid-study
    proc.wait()
    done_before = {p.name: p.stat().st_mtime_ns for p in records.glob("*.json")}
    assert 2 <= len(done_before) < len(reference), "the kill must land mid-run"
    for p in records.glob("*.json"):
        json.loads(p.read_text())  # no partial record
    assert main(["study", str(tiny), "--results", str(tmp_path), "--no-progress"]) == 0
    after = {p.name: p.stat().st_mtime_ns for p in records.glob("*.json")}
    assert all(after[k] == v for k, v in done_before.items()), "a finished cell was trained again"
    resumed = pd.read_csv(tmp_path / "tiny" / "runs.csv")[VALUES].sort_values("cell_id", ignore_index=True)
    assert resumed["cell_id"].is_unique
    pd.testing.assert_frame_equal(resumed, reference)
    assert not [p for p in records.iterdir() if not p.name.endswith(".json")]


def test_same_study_and_seed_give_identical_records(tiny, reference, tmp_path):
    assert main(["study", str(tiny), "--results", str(tmp_path), "--no-progress", "--jobs", "2"]) == 0
    again = pd.read_csv(tmp_path / "tiny" / "runs.csv")[VALUES].sort_values("cell_id", ignore_index=True)
    pd.testing.assert_frame_equal(again, reference)


def test_failed_cells_are_kept_counted_and_retried(tiny, tmp_path, capsys):
    text = tiny.read_text().replace("train: {epochs: 2, batch_size: 16}",
                                    "train: {epochs: 2, batch_size: 16, optimizer: sgd, lr: 1.0e+12}")
    bad = tmp_path / "tiny.yaml"
    bad.write_text(text)
    assert main(["study", str(bad), "--results", str(tmp_path), "--no-progress"]) == 1
    runs = pd.read_csv(tmp_path / "tiny" / "runs.csv")
    failed = runs[runs["status"] == "failed"]
    assert len(failed) >= 1 and failed["error"].str.contains("Diverged").all()
    assert f"{len(failed)} cell(s) failed" in capsys.readouterr().err
    assert main(["study", str(bad), "--results", str(tmp_path), "--no-progress"]) == 1  # nothing rerun
    assert f"nothing to do: all {len(runs)} cells already have records" in capsys.readouterr().out
    assert main(["study", str(bad), "--results", str(tmp_path), "--no-progress", "--retry-failed"]) == 1
    assert f"for {len(failed)} cells ({len(runs) - len(failed)} already done" in capsys.readouterr().out


def test_a_second_runner_on_the_same_folder_is_refused(tiny, tmp_path, capsys):
    from transferbench.sweep.runner import results_lock

    with results_lock(tmp_path / "tiny"):
        assert main(["study", str(tiny), "--results", str(tmp_path), "--no-progress"]) == 2
    assert "another transferbench run holds" in capsys.readouterr().err


def test_dask_local_cluster_gives_the_same_records(tiny, reference, tmp_path):
    distributed = pytest.importorskip("dask.distributed")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, host="127.0.0.1", processes=True,
                                  dashboard_address=None) as cluster:
        rc = main(["study", str(tiny), "--results", str(tmp_path), "--no-progress", "--backend", "dask",
                   "--scheduler", cluster.scheduler_address])
    assert rc == 0
    got = pd.read_csv(tmp_path / "tiny" / "runs.csv")[VALUES].sort_values("cell_id", ignore_index=True)
    pd.testing.assert_frame_equal(got, reference)
