from pathlib import Path

import pytest

from transferbench.core.errors import ConfigError
from transferbench.core.study import expand, load_study, study_path

STUDIES = Path(__file__).parents[1] / "studies"


def write(tmp_path, text):
    p = tmp_path / "s.yaml"
    p.write_text(text)
    return p


MINIMAL = """
name: t
backbones: [{model: tf_efficientnet_lite0, weights: imagenet}]
targets: [{dataset: textures}, {dataset: digits}]
grid: {frozen_depth: [0, all], n_per_class: [2, 4], schedule: [constant, {name: cosine, lr: 0.01}], seed: [0, 1]}
"""


@pytest.mark.parametrize("name", sorted(p.stem for p in STUDIES.glob("*.yaml")))
def test_shipped_studies_load(name):
    study = load_study(study_path(name, STUDIES))
    assert study.name == name
    assert len(expand(study)) > 0


def test_domain_gap_meets_the_grid_floor():
    """The default study can answer its question: >= 24 conditions from >= 6 base datasets, natural to structured,
    label-preserving shifts at graded severities, all four axes swept on anchor conditions, scratch's curve."""
    from transferbench.data import SHIFTS

    s = load_study(STUDIES / "domain_gap.yaml")
    cells = expand(s)
    assert len(s.backbones) >= 2 and all(b.weights == "imagenet" for b in s.backbones)
    assert len(s.targets) >= 24 and len({t.dataset for t in s.targets}) >= 6
    assert {"textures", "digits", "glyphs", "counting", "sprites"} <= {t.dataset for t in s.targets}
    graded = {}  # label-preserving shift families: one dataset, the shift at several severities
    for t in s.targets:
        if t.shift and SHIFTS.meta(t.shift).get("label_preserving"):
            graded.setdefault((t.dataset, t.shift), set()).add(t.severity)
    assert max(len(v) for v in graded.values()) >= 3 and len({shift for _, shift in graded}) >= 2
    # anchor conditions sweep backbone x frozen depth x size x schedule
    for axis in ("model", "frozen_depth", "n_per_class", "schedule"):
        assert len({getattr(c, axis) for c in cells if c.arm == "transfer"}) >= 2, axis
    assert {0, "all"} <= set(s.grid.frozen_depth) and len(s.grid.frozen_depth) >= 3 and len(s.grid.seed) >= 3
    dial = set.intersection(*(set(t.n_per_class or s.grid.n_per_class) for t in s.targets))
    assert dial, "no size is trained on every condition"
    conditions = {c.condition for c in cells if c.arm == "transfer" and c.frozen_depth == 0 and c.n_per_class in dial
                  and c.model == "tf_efficientnet_lite0" and c.schedule == "cosine"}
    assert len(conditions) == len(s.targets)  # one arm at one size across the whole dial
    assert s.scratch.curve and max(s.scratch.curve) >= 4 * max(dial)  # the curve reaches 4x above the dial's size
    # the fair protocol: a step budget, early stopping, best-validation weights, LR chosen per arm on validation
    assert s.train.steps and s.train.patience and s.train.precise_bn and len(s.train.lrs) >= 2
    assert s.scratch.lrs and len(s.scratch.lrs) >= 2 and s.train.probe == "lbfgs"
    assert set(s.baselines.methods) == {"nearest_centroid", "logistic_pixels"}


def test_expand_counts_and_matched_scratch(tmp_path):
    cells = expand(load_study(write(tmp_path, MINIMAL)))
    transfer = [c for c in cells if c.arm == "transfer"]
    scratch = [c for c in cells if c.arm == "scratch"]
    pixels = [c for c in cells if c.arm == "pixels"]
    sgd = [c for c in transfer if c.frozen_depth == 0]
    probes = [c for c in transfer if c.frozen_depth == "all"]
    assert len(sgd) == 2 * 2 * 2 * 2  # targets x sizes x schedules x seeds
    assert len(probes) == 2 * 2 * 2 and {c.solver for c in probes} == {"lbfgs"}  # one convex fit, no schedule
    assert len(scratch) == 2 * 2 * 2 * 2  # one per grid point without depth
    assert len(pixels) == 2 * 2 * 2 * 2  # two methods per k-shot subset
    assert all(c.weights == "none" and c.frozen_depth == 0 for c in scratch)
    assert len({c.cell_id for c in cells}) == len(cells)
    assert {c.lr for c in sgd if c.schedule == "cosine"} == {0.01}
    assert {c.lr for c in sgd if c.schedule == "constant"} == {0.001}  # train.lr default


def test_a_target_may_train_fewer_arms_and_scratch_draws_its_curve(tmp_path):
    """A fractional design: digits trains one schedule and full fine-tuning only; scratch and the pixel baselines
    also train at the curve's size 8, where no transfer arm does; n_cells counts as expand builds."""
    from transferbench.core.study import n_cells

    text = MINIMAL.replace("{dataset: digits}", "{dataset: digits, frozen_depth: [0], schedule: [cosine]}") + \
        "scratch: {curve: [8, 2]}\n"
    study = load_study(write(tmp_path, text))
    cells = expand(study)
    digits = [c for c in cells if c.dataset == "digits"]
    assert {(c.frozen_depth, c.schedule) for c in digits if c.arm == "transfer"} == {(0, "cosine")}
    assert {c.schedule for c in digits if c.arm == "scratch"} == {"cosine"}
    at_8 = [c for c in cells if c.n_per_class == 8]
    assert {c.arm for c in at_8} == {"scratch", "pixels"} and len(at_8) == (2 + 1 + 2 + 2) * 2  # seeds
    assert n_cells(study) == len(cells)
    plain = expand(load_study(write(tmp_path, MINIMAL)))  # the untouched target's cells keep their ids
    assert {c.cell_id for c in cells if c.dataset == "textures" and c.n_per_class != 8} == \
        {c.cell_id for c in plain if c.dataset == "textures"}


@pytest.mark.parametrize("target,field", [("{dataset: digits, schedule: [cosin]}", "targets.1.schedule"),
                                          ("{dataset: digits, backbones: [resnet18]}", "targets.1.backbones"),
                                          ("{dataset: digits, schedule: []}", "targets.1.schedule")])
def test_a_target_picks_its_arms_from_the_study(tmp_path, target, field):
    from transferbench.sweep.planning import plan

    with pytest.raises(ConfigError) as e:
        plan(load_study(write(tmp_path, MINIMAL.replace("{dataset: digits}", target))))
    assert e.value.field == field


def test_lr_candidates_race_in_a_cell_or_make_a_grid(tmp_path):
    racing = expand(load_study(write(tmp_path, MINIMAL), ["train.lrs=[0.001,0.003]", "scratch.lrs=[0.003,0.01]"]))
    assert {tuple(c.lrs) for c in racing if c.arm == "transfer" and c.solver == "sgd"} == {(0.001, 0.003)}
    assert {tuple(c.lrs) for c in racing if c.arm == "scratch"} == {(0.003, 0.01)}
    grid = expand(load_study(write(tmp_path, MINIMAL), ["train.lrs=[0.001,0.003]", "train.lr_search=grid"]))
    assert len([c for c in grid if c.arm == "scratch"]) == 2 * len([c for c in racing if c.arm == "scratch"])
    assert {c.lr for c in grid if c.arm == "transfer" and c.solver == "sgd"} == {0.001, 0.003}


def test_cell_id_is_a_function_of_the_config(tmp_path):
    a = expand(load_study(write(tmp_path, MINIMAL)))
    b = expand(load_study(write(tmp_path, MINIMAL)))
    assert [c.cell_id for c in a] == [c.cell_id for c in b]
    c = expand(load_study(write(tmp_path, MINIMAL), ["train.epochs=3"]))
    assert not {x.cell_id for x in a} & {x.cell_id for x in c}


def test_overrides_are_parsed_as_yaml(tmp_path):
    s = load_study(write(tmp_path, MINIMAL), ["grid.seed=[0,1,2]", "train.epochs=3", "scratch.lr=0.05"])
    assert s.grid.seed == [0, 1, 2] and s.train.epochs == 3 and s.scratch.lr == 0.05


def test_profile_applies_its_overrides(tmp_path):
    p = write(tmp_path, MINIMAL + "profiles:\n  gpu: {train.epochs: 50, train.image_size: 96}\n")
    s = load_study(p, profile="gpu")
    assert (s.train.epochs, s.train.image_size) == (50, 96)


def test_all_errors_at_once_with_dotted_paths(tmp_path):
    bad = MINIMAL.replace("n_per_class: [2, 4]", "n_per_class: [-1, 4]").replace("seed: [0, 1]", "seed: [0, 0]")
    with pytest.raises(ConfigError) as e:
        load_study(write(tmp_path, bad + "train: {epochs: many}\n"))
    msg = str(e.value)
    assert "grid.n_per_class.0" in msg and "grid.seed" in msg and "duplicate" in msg and "train.epochs" in msg


def test_unknown_key_gets_did_you_mean(tmp_path):
    with pytest.raises(ConfigError, match=r"train.epoch: unknown key; did you mean 'epochs'"):
        load_study(write(tmp_path, MINIMAL + "train: {epoch: 3}\n"))


def test_unknown_override_path_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown override path.*did you mean 'seed'"):
        load_study(write(tmp_path, MINIMAL), ["grid.seeds=[0,1]"])


def test_malformed_yaml_names_the_line(tmp_path):
    with pytest.raises(ConfigError, match=r"s.yaml:\d+:\d+: malformed YAML"):
        load_study(write(tmp_path, "name: [unclosed\n"))


def test_axes_and_sharing_rules_name_cell_fields():
    """The one declaration of the grid's axes and of what cells may share: a misspelt field would silently split
    (or merge) groups, so every name must be a Cell field, and every plain axis a Grid list of Cell values."""
    from transferbench.core.study import SHARE_FEATURES_ACROSS, SHARE_PACK_ACROSS, Cell, Grid, cell_axes

    assert SHARE_FEATURES_ACROSS <= set(Cell.model_fields) and SHARE_PACK_ACROSS <= set(Cell.model_fields)
    assert all(a in Cell.model_fields and a in Grid.model_fields for a in cell_axes())


def test_counting_stops_past_the_bound():
    from transferbench.core.study import n_cells

    study = load_study(study_path("smoke"))
    assert n_cells(study) == 192 and n_cells(study, most=10) == 11
