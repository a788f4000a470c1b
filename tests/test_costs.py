"""`transferbench plan`: what a study will cost, counted as training then spends it."""

import pytest

from transferbench.cli import main
from transferbench.core.study import Cell, expand, load_study, study_path
from transferbench.models.features import FeatureCache
from transferbench.sweep.costs import cell_cost, gpu_packing, shed
from transferbench.training.cell import Prepared, train_together

CELL = dict(arm="transfer", model="tf_efficientnet_lite0", weights="imagenet", dataset="textures", shift=None,
            severity=0, frozen_depth="all", n_per_class=2, schedule="cosine", lr=0.0, lrs=[1e-3, 3e-3], seed=0,
            epochs=1, steps=15, eval_every=5, patience=0, solver="sgd", batch_size=8, image_size=32,
            optimizer="adamw", weight_decay=0.01, augment=False, device="cpu", amp=False, channels_last=False)


@pytest.mark.parametrize("steps", [15, 16])
@pytest.mark.parametrize("given_lr", [None, 3e-3])
def test_a_cells_cost_is_what_its_training_spends(given_lr, steps, torch_single_thread):
    """20 examples in batches of 8, 8 and 4; 15 or 16 steps (whole epochs or not); two LR candidates race for the
    first 3 (or one LR taken from another seed's cell): the planned runs, optimizer steps and images are exactly
    those the training takes."""
    cell = Cell(**(CELL | dict(steps=steps) | (dict(lr_from_seed=1) if given_lr else {})))
    cost = cell_cost(cell)
    prepared = Prepared(cell, FeatureCache(), lr=given_lr)
    train_together([prepared.training])
    runs = prepared.training.runs
    assert cost.runs == len(runs) == (1 if given_lr else 2)
    assert cost.steps == sum(r.steps for r in runs) == steps + (0 if given_lr else 3)
    assert cost.images == sum(r.seen for r in runs)


def test_closed_form_cells_cost_no_sgd():
    assert cell_cost(Cell(**(CELL | dict(solver="lbfgs")))) is None
    assert cell_cost(Cell(**(CELL | dict(arm="pixels")))) is None


def test_a_pack_sheds_its_copies_as_the_runner_does():
    """Lengths 3, 6, 9 (tests/test_packed.py trains them): a pack of three for 3 steps, of two for 3 more, the last
    run alone for its last 3."""
    assert shed([3, 6, 9], 0.75) == (6, 3)
    assert shed([5, 5, 5, 5], 0.75) == (5, 0) and shed([], 0.75) == (0, 0) and shed([2, 10], 0.75) == (2, 8)


def test_gpu_packing_of_a_small_study():
    """Seed 0 races two LRs for 2 steps (a pack of two), then goes on alone for 8; seeds 1 and 2 train at its LR
    for 10 steps in a pack of two: 24 of the 32 run-steps in 12 pack steps."""
    study = load_study(study_path("smoke"), [
        "backbones=[{model: tf_efficientnet_lite0}]", "targets=[{dataset: textures}]", "scratch.enabled=false",
        "grid.frozen_depth=[0]", "grid.n_per_class=[2]", "grid.schedule=[cosine]", "grid.seed=[0,1,2]",
        "train.steps=10", "train.lrs=[0.001,0.003]", "train.lr_search=first_seed"], None)
    cells = expand(study)
    assert sum(cell_cost(c).steps for c in cells if cell_cost(c)) == 32
    assert gpu_packing(cells, most=16) == (24, 12)


def test_plan_prints_the_cost_of_each_arm(capsys):
    assert main(["plan", "smoke", "grid.seed=[0,1]"]) == 0
    out = capsys.readouterr().out
    assert "scratch" in out and "transfer frozen 0" in out and "closed form" in out and "total" in out
    assert main(["plan", "smoke", "train.steps=-3"]) == 2  # refused as `study` refuses it
    assert "train.steps" in capsys.readouterr().err


def test_plan_into_a_closed_pipe_stops_quietly(monkeypatch, capsys):
    """`transferbench plan domain_gap | head -2`: the reader went away; no error line blaming a path."""
    class ClosedPipe:
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            pass

    monkeypatch.setattr("sys.stdout", ClosedPipe())
    assert main(["plan", "smoke", "grid.seed=[0]"]) == 1
    assert capsys.readouterr().err == ""
