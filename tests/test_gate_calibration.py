"""Calibration of the regression gate with real reruns (slow: CI runs it with `make test-slow`).

A base run of a small study, then reruns that change nothing that matters (other seeds, another thread
count) must pass; reruns with a planted regression in the code must fail: pretrained weights replaced by
random init, the frozen prefix left trainable, the LR multiplied by 100, one target's labels shuffled.
Cells run in this process (backend: sequential) so that a monkeypatched function is the one that trains.
"""

import dataclasses
from pathlib import Path

import pytest
import torch

from transferbench.analysis.compare import compare, read_runs, render
from transferbench.cli import main
from transferbench.data import load_target
from transferbench.models import backbones
from transferbench.sweep import runner
from transferbench.training import cell as training_cell
from transferbench.training import loop

pytestmark = pytest.mark.slow

# Long enough to learn (40-60 steps a cell): a gate cannot find a regression in a study that measures noise. The
# probe is trained by the SGD loop here, so that a prefix left trainable has layers to train.
STUDY = """name: gate
backbones: [{model: tf_efficientnet_lite0, weights: imagenet}]
targets: [{dataset: textures}, {dataset: digits}]
grid: {frozen_depth: [all], n_per_class: [2, 4], schedule: [constant], seed: [0, 1, 2, 3]}
train: {epochs: 20, batch_size: 16, image_size: 32, lr: 0.003, probe: sgd}
scratch: {lr: 0.003}
run: {jobs: 1, threads_per_worker: 1, backend: sequential}
"""
OTHER_SEEDS = "grid.seed=[4,5,6,7]"


@pytest.fixture(autouse=True)
def fresh_process_state(tmp_path, monkeypatch):
    """No features, templates or targets carried over from another run: a plant must reach every cell."""
    monkeypatch.setenv("TRANSFERBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(runner, "_WORKER_CACHE", None)
    backbones._TEMPLATES.clear()
    load_target.cache_clear()
    yield
    backbones._TEMPLATES.clear()
    load_target.cache_clear()
    torch.set_num_threads(1)


def run(folder: Path, *overrides: str) -> Path:
    study = folder / "gate.yaml"
    study.write_text(STUDY)
    main(["study", str(study), "--results", str(folder / "results"), "--no-progress", *overrides])
    return folder / "results" / "gate"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("base")
    mp = pytest.MonkeyPatch()
    mp.setenv("TRANSFERBENCH_CACHE", str(folder / "cache"))
    try:
        return run(folder)
    finally:
        mp.undo()


def gate(base: Path, new: Path):
    result = compare(base, new)
    print(render(result, base, new))
    return result


def test_a_rerun_with_other_seeds_passes(base, tmp_path):
    assert gate(base, run(tmp_path, OTHER_SEEDS)).ok


def test_a_rerun_with_another_thread_count_passes(base, tmp_path):
    assert gate(base, run(tmp_path, OTHER_SEEDS, "run.threads_per_worker=2")).ok


def test_random_weights_instead_of_pretrained_fail(base, tmp_path, monkeypatch):
    monkeypatch.setattr(backbones, "_load", lambda model, state_dict, weights: None)
    result = gate(base, run(tmp_path, OTHER_SEEDS))
    assert any("weights_digest changed" in p for p in result.problems), result.problems
    assert any("of gain dropped" in p for p in result.problems), result.problems  # and the numbers show it too


def test_a_frozen_prefix_left_trainable_fails(base, tmp_path, monkeypatch):
    split = backbones.split_at_depth
    # The frozen groups are handed to the optimizer with the rest (and the prefix cache is bypassed, as it must be).
    monkeypatch.setattr(backbones, "split_at_depth", lambda bb, k, allow=True: (*split(bb, 0, allow)[:2], False))
    result = gate(base, run(tmp_path, OTHER_SEEDS))
    assert any("trainable_params changed" in p for p in result.problems), result.problems


def test_the_lr_multiplied_by_100_fails(base, tmp_path, monkeypatch):
    make = loop.make_optimizer
    monkeypatch.setattr(loop, "make_optimizer",
                        lambda params, name, lr, wd, lrs=None: make(params, name, 100 * lr, wd, lrs))
    result = gate(base, run(tmp_path, OTHER_SEEDS))
    assert any("scratch accuracy dropped" in p or "failed" in p for p in result.problems), result.problems


def shuffle_digits_labels(monkeypatch):
    load = training_cell.load_target

    def shuffled(dataset, *args, **kwargs):
        t = load(dataset, *args, **kwargs)
        if dataset != "digits":
            return t
        g = torch.Generator().manual_seed(0)
        y = dict(t.y, train=t.y["train"][torch.randperm(len(t.y["train"]), generator=g)])
        return dataclasses.replace(t, y=y)

    monkeypatch.setattr(training_cell, "load_target", shuffled)


def test_shuffled_labels_on_one_target_fail(base, tmp_path, monkeypatch):
    shuffle_digits_labels(monkeypatch)
    result = gate(base, run(tmp_path, OTHER_SEEDS))
    assert any("of gain dropped" in p and "digits" in p for p in result.problems), result.problems


# Confirm before failing (compare --confirm): the flagged tests' cells are trained again here, at fresh seeds.
def test_confirmation_clears_a_single_injected_false_positive(base, tmp_path, capsys):
    """An unchanged rerun whose records are edited so that one grid point collapses (what a rare unlucky draw looks
    like to the gate) fails without confirmation and passes with it: the point's cells, trained again, do not drop."""
    new = run(tmp_path, OTHER_SEEDS)
    runs = read_runs(new)
    hit = (runs["arm"] == "transfer") & (runs["target"] == "textures") & (runs["n_per_class"] == 4)
    runs.assign(test_acc=runs["test_acc"].where(~hit, 0.0)).to_csv(new / "runs.csv", index=False)
    assert main(["compare", str(base), str(new)]) == 1
    capsys.readouterr()
    assert main(["compare", str(base), str(new), "--confirm", "--no-progress"]) == 0
    out = capsys.readouterr().out
    print(out)
    assert "confirmed, " in out and "0 confirmed" in out and "no regression" in out
    rerun = read_runs(new / "confirm")
    assert set(rerun["seed"]) == {8, 9, 10, 11} and (rerun["arm"] == "transfer").any()


def test_confirmation_keeps_a_planted_regression_failing(base, tmp_path, monkeypatch, capsys):
    shuffle_digits_labels(monkeypatch)
    new = run(tmp_path, OTHER_SEEDS)
    assert main(["compare", str(base), str(new), "--confirm", "--no-progress", "--format", "md"]) == 1
    out = capsys.readouterr().out
    print(out)
    assert "## transferbench gate: FAIL" in out and "| confirmed |" in out and "digits" in out
