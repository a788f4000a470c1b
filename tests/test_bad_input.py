"""Bad input: refused with exit code 2, a short error naming the field and the fix, results/ untouched."""

import stat
from pathlib import Path

import pytest
import torch

from transferbench.cli import main

GOOD = """name: t
backbones: [{model: tf_efficientnet_lite0, weights: imagenet}]
targets: [{dataset: textures}]
grid: {frozen_depth: [0, all], n_per_class: [2], schedule: [constant], seed: [0, 1]}
train: {epochs: 1}
profiles: {fast: {train.epochs: 1}}
"""


class Evil:
    pass


def corrupt_record(results: Path):
    (results / "t" / "records").mkdir(parents=True)
    (results / "t" / "records" / "0123456789abcdef.json").write_text('{"cell_id": "0123')


def read_only(results: Path):
    results.chmod(stat.S_IRUSR | stat.S_IXUSR)


def pickled_checkpoint(tmp: Path):
    torch.save({"obj": Evil()}, tmp / "evil.pth")


# (case, study text or a replacement, extra CLI args, setup, what the error must name)
CASES = [
    ("malformed yaml", "name: [t\n", [], None, "malformed YAML"),
    ("a NUL byte", "name: t\x00\n", [], None, "not YAML text (special characters are not allowed)"),
    ("not a mapping", "- a\n- b\n", [], None, "must be a mapping"),
    ("unknown key", GOOD.replace("epochs: 1", "epoch: 1"), [], None, "train.epoch: unknown key; did you mean 'epochs'"),
    ("wrong type", GOOD.replace("epochs: 1", "epochs: many"), [], None, "train.epochs"),
    ("missing field", GOOD.replace("backbones: [{model: tf_efficientnet_lite0, weights: imagenet}]\n", ""), [], None,
     "backbones: Field required"),
    ("unknown backbone", GOOD.replace("lite0,", "lite9,"), [], None, "unknown timm model 'tf_efficientnet_lite9'"),
    ("unknown weight source", GOOD.replace("weights: imagenet", "weights: imagenet21k"), [], None,
     "unknown weight source 'imagenet21k'"),
    ("no bundled weights", GOOD.replace("tf_efficientnet_lite0", "resnet18"), [], None, "no bundled ImageNet weights"),
    ("unknown dataset", GOOD.replace("dataset: textures", "dataset: texture"), [], None,
     "targets.0.dataset: unknown dataset 'texture' -- fix: did you mean 'textures'"),
    ("unknown shift", GOOD.replace("{dataset: textures}", "{dataset: textures, shift: fog, severity: 2}"), [], None,
     "targets.0.shift: unknown shift 'fog'"),
    ("shift without severity", GOOD.replace("{dataset: textures}", "{dataset: textures, shift: contrast}"), [], None,
     "a shift needs a severity"),
    ("severity out of range", GOOD.replace("{dataset: textures}", "{dataset: textures, shift: contrast, severity: 7}"),
     [], None, "targets.0.severity"),
    ("unknown schedule", GOOD.replace("schedule: [constant]", "schedule: [cosin]"), [], None,
     "unknown schedule 'cosin' -- fix: did you mean 'cosine'"),
    ("negative size", GOOD.replace("n_per_class: [2]", "n_per_class: [-5]"), [], None, "grid.n_per_class.0"),
    ("size larger than a class", GOOD.replace("n_per_class: [2]", "n_per_class: [500]"), [], None,
     "holds only 60 in its smallest class"),
    ("depth beyond the groups", GOOD.replace("frozen_depth: [0, all]", "frozen_depth: [0, 12]"), [], None,
     "frozen depth 12 is beyond the backbone's 8 groups"),
    ("missing weights file", GOOD.replace("weights: imagenet", "weights: nowhere/w.pth"), [], None, "does not exist"),
    ("checkpoint needing unpickling", GOOD.replace("weights: imagenet", "weights: {tmp}/evil.pth"), [],
     pickled_checkpoint, "arbitrary unpickling"),
    ("corrupted record", GOOD, [], lambda tmp: corrupt_record(tmp / "results"), "corrupted record file"),
    ("read-only results", GOOD, [], lambda tmp: read_only(tmp / "results"), "--results: "),
    ("empty grid", GOOD.replace("seed: [0, 1]", "seed: []"), [], None, "grid.seed: Value error, empty seed list"),
    ("duplicate axis values", GOOD.replace("seed: [0, 1]", "seed: [1, 1]"), [], None, "duplicate seed values"),
    ("unknown override path", GOOD, ["grid.seeds=[0]"], None, "unknown override path"),
    ("override without =", GOOD, ["grid.seed"], None, "expected KEY=VALUE"),
    ("unknown profile", GOOD, ["--profile", "gpuu"], None, "no profile 'gpuu'"),
    ("dask without a scheduler", GOOD, ["--backend", "dask"], None, "run.scheduler"),
    ("non-positive lr", GOOD.replace("epochs: 1", "epochs: 1, lr: 0"), [], None, "train.lr"),
    ("frozen depth misspelt", GOOD.replace("frozen_depth: [0, all]", "frozen_depth: [0, al]"), [], None,
     "grid.frozen_depth.1: Value error, a frozen depth is a number of groups frozen (0 = fine-tune everything) or "
     "'all', not 'al'"),
    ("a profile where none is defined", GOOD.replace("profiles: {fast: {train.epochs: 1}}\n", ""),
     ["--profile", "gpu"], None, "this study defines no profiles"),
]


def snapshot(path: Path) -> dict:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in path.rglob("*")} if path.exists() else {}


def refuse(tmp_path: Path, capsys, text: str, extra=(), setup=None) -> tuple[str, bool, bool]:
    """Run a study that must be refused: (stderr, results folder untouched, nothing written beside it). Asserts
    exit code 2 and one line naming a fix."""
    results = tmp_path / "results"
    results.mkdir()
    if setup:
        setup(tmp_path)
    study = tmp_path / "study.yaml"
    study.write_text(text.replace("{tmp}", str(tmp_path)))
    before, beside = snapshot(results), set(snapshot(tmp_path))
    try:
        rc = main(["study", str(study), "--results", str(results), "--no-progress", *extra])
    finally:
        results.chmod(0o755)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("error: ") and "fix:" in err.splitlines()[0], err
    return err, snapshot(results) == before, set(snapshot(tmp_path)) == beside


@pytest.mark.parametrize("case,text,extra,setup,expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_refused(tmp_path, capsys, case, text, extra, setup, expected):
    err, untouched, _ = refuse(tmp_path, capsys, text, extra, setup)
    assert expected in err
    assert untouched


def test_unknown_study_name(capsys):
    assert main(["study", "domain_gapp"]) == 2
    assert "did you mean 'domain_gap'" in capsys.readouterr().err


def test_there_are_at_least_twenty_cases():
    assert len(CASES) >= 20


def test_a_download_without_a_network_says_so(monkeypatch, capsys):
    """A torchvision dataset or network weights on a machine without a network: one line that says a download
    failed (not a disk error), exit 2."""
    from urllib.error import URLError

    from transferbench.sweep import planning

    def offline(study):
        raise URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(planning, "plan", offline)
    assert main(["plan", "smoke"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: download failed") and "fix:" in err and len(err.splitlines()) == 1
