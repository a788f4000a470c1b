"""Which layers train: train_groups arms, LP-FT and layer-wise LR decay, on the real training path (cell.fit)."""

import copy

import pytest
import torch

from transferbench.core.errors import ConfigError
from transferbench.core.study import Cell, expand, load_study, n_cells, study_path
from transferbench.models.backbones import create_backbone, split_for_training
from transferbench.models.features import FeatureCache
from transferbench.training import cell as training_cell
from transferbench.training import loop
from transferbench.training.schedules import layer_lrs

BASE = dict(arm="transfer", model="tf_efficientnet_lite0", weights="imagenet", dataset="textures", shift=None,
            severity=0, frozen_depth=0, n_per_class=2, schedule="cosine", lr=3e-3, seed=0, epochs=1, steps=6,
            eval_every=3, batch_size=10, image_size=32, optimizer="adamw", weight_decay=0.0, augment=False,
            device="cpu", amp=False, channels_last=False, precise_bn=True, keep_best=True)


def cell(**kw) -> Cell:
    return Cell(**(BASE | kw))


def changed_keys(before: dict, after: dict) -> set[str]:
    return {k for k in before if not torch.equal(before[k], after[k])}


@pytest.mark.parametrize("groups", [[0], [2, 7]])
def test_only_the_named_groups_and_the_head_train(groups, torch_single_thread):
    """Weights and BatchNorm statistics of every other group come out exactly as they went in."""
    fresh = split_for_training(create_backbone("tf_efficientnet_lite0", "imagenet", 10, 0), 0, groups)
    before = {k: v.clone() for k, v in fresh.suffix.state_dict().items()}
    suffix, record = training_cell.fit(cell(train_groups=groups), FeatureCache())
    after = suffix.state_dict()
    assert set(after) == set(before)  # the same structure, frozen BatchNorm included
    frozen_bn = [n for n, m in suffix.named_modules() if type(m).__name__.startswith("FrozenBatchNorm")]
    assert frozen_bn and all(f"{n}.running_mean" in before for n in frozen_bn)
    frozen = {f"{n}.{b}" for n in frozen_bn for b in ("weight", "bias", "running_mean", "running_var")} | {
        n for n, p in fresh.suffix.named_parameters() if not p.requires_grad}
    trainable = set(fresh.depth_of)
    assert not changed_keys(before, after) & frozen
    assert {k for k in changed_keys(before, after) if k in trainable} == {k for k in trainable if "weight" in k
                                                                          or "bias" in k}
    assert record["trained_groups"] == sorted(groups) and record["frozen_groups"] == min(groups)
    assert record["tuning"] == "groups " + "+".join(map(str, groups))
    assert 0 < record["trained_fraction"] < 1 and record["frozen_fraction"] == pytest.approx(
        1 - record["trained_fraction"], abs=1e-6)


def test_the_last_group_alone_is_frozen_depth_7_exactly(torch_single_thread):
    """train_groups [-1] and frozen_depth 7 are the same network on the same batches: the same numbers, and the
    prefix before the last group is served from the cache."""
    cache = FeatureCache()
    last = training_cell.train_cell(cell(train_groups=[-1], lrs=[1e-3, 3e-3], lr=0.0), cache)
    seven = training_cell.train_cell(cell(frozen_depth=7, lrs=[1e-3, 3e-3], lr=0.0), cache)
    assert last["frozen_groups"] == 7 and last["cache"] == "miss" and seven["cache"] == "memory"
    for key in ("test_acc", "test_loss", "val_acc", "lr_chosen", "steps_taken", "trainable_params",
                "trained_fraction"):
        assert last[key] == seven[key], key
    assert last["tuning"] == "groups 7" and seven["tuning"] == "frozen 7"


def test_lp_ft_starts_fine_tuning_from_the_converged_probe(monkeypatch, torch_single_thread):
    """The network handed to the training loop is, at step 0, the probe: with the BatchNorm statistics of the
    training subset (as validation computes them) it scores the probe's validation accuracy, and its head is the
    L-BFGS solution (a fitted probe is far better than the random head full fine-tuning starts from)."""
    seen = {}
    together = training_cell.train_together

    def spy(trainings, *args, **kw):
        t = trainings[0]
        learner, net = t.runs[0], copy.deepcopy(t.suffix)
        loop.precise_bn(net, learner.examples("train")[0], t.cell.channels_last)
        seen.setdefault("val_acc", loop.evaluate(net, *learner.examples("val"), torch.device("cpu"), False,
                                                 t.cell.channels_last)[0])
        return together(trainings, *args, **kw)

    monkeypatch.setattr(training_cell, "train_together", spy)
    _, record = training_cell.fit(cell(schedule="lp_ft", n_per_class=8), FeatureCache())
    _, plain = training_cell.fit(cell(schedule="cosine"), FeatureCache())
    assert seen["val_acc"] == pytest.approx(record["probe_val_acc"], abs=1.5 / record["n_test"])
    assert record["probe_val_acc"] > 0.3  # 10 classes: a fitted head, not a random one
    assert record["tuning"] == "LP-FT" and record["trained_fraction"] == 1.0 and "probe_val_acc" not in plain


def test_layer_decay_gives_each_group_its_lr(monkeypatch, torch_single_thread):
    groups_seen = []
    make = loop.make_optimizer

    def spy(*args, **kw):
        opt = make(*args, **kw)
        groups_seen.append(sorted(g["initial_lr"] if "initial_lr" in g else g["lr"] for g in opt.param_groups))
        return opt

    monkeypatch.setattr(loop, "make_optimizer", spy)
    record = training_cell.train_cell(cell(schedule="cosine_llrd"), FeatureCache())
    lrs = groups_seen[0]
    assert len(lrs) == 9 and lrs[-1] == pytest.approx(3e-3) and lrs[0] == pytest.approx(3e-3 * 0.75 ** 8)
    assert record["tuning"] == "LLRD 0.75" and record["converged"] in (True, False)


def test_layer_lrs_decay_from_the_head():
    lrs = layer_lrs({"stem.w": 0, "mid.w": 4, "head.w": 8}, 1.0, 0.5)
    assert lrs == {"stem.w": 0.5 ** 8, "mid.w": 0.5 ** 4, "head.w": 1.0}


def which_layers(*overrides):
    """The smoke study with which-layers arms; an override replaces the default of its field (a field given twice
    on one command line is refused)."""
    given = dict(o.split("=", 1) for o in ["targets=[{dataset: digits}]", "grid.frozen_depth=[0, all]",
                                           "grid.train_groups=[[0], [-1]]", "grid.recipes=[lp_ft]",
                                           "grid.schedule=[cosine]", *overrides])
    return load_study(study_path("smoke"), [f"{k}={v}" for k, v in given.items()])


def test_expand_adds_one_arm_per_train_groups_entry_and_recipe_without_scratch_twins():
    study = which_layers()
    cells = expand(study)
    assert len(cells) == n_cells(study)
    per_point = [c for c in cells if c.model == "tf_efficientnet_lite0" and c.seed == 0 and c.n_per_class == 2]
    transfer = sorted((str(c.frozen_depth), str(c.train_groups), c.schedule) for c in per_point
                      if c.arm == "transfer")
    assert transfer == [("0", "None", "cosine"), ("0", "None", "lp_ft"), ("0", "[-1]", "cosine"),
                        ("0", "[0]", "cosine"), ("all", "None", "lbfgs")]
    assert [c.schedule for c in per_point if c.arm == "scratch"] == ["cosine"]
    assert all(c.cell_id == Cell(**c.model_dump()).cell_id for c in cells)


@pytest.mark.parametrize("override, field", [
    ("grid.train_groups=[[8]]", "grid.train_groups"),
    ("grid.recipes=[cosine]", "grid.recipes.0"),
    ("grid.schedule=[lp_ft]", "grid.schedule.0.name"),
    ("grid.train_groups=[[0, 0]]", "train_groups"),
])
def test_bad_arms_are_refused_at_planning_naming_the_field(override, field):
    from transferbench.sweep.planning import plan

    with pytest.raises(ConfigError) as e:
        plan(which_layers(override))
    assert field in str(e.value)
