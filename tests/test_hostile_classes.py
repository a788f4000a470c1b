"""Hostile input, second pass: one table per class of problem, each case as a user meets it.

1. the gate never passes what it cannot test; 2. labels cannot break a table, a figure or HTML; 3. a key given
twice is refused; 4. no write follows a link planted in the results folder; 5. and 6. bad input is refused with
exit 2 at planning, not as a traceback or after cells failed; 7. errors say the true cause.
"""

import dataclasses
import errno
import io
import json
import os
import shutil
import stat
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from test_bad_input import refuse
from test_hostile import GOOD, _write, write_folder

from transferbench.analysis import tables
from transferbench.cli import main
from transferbench.core.errors import ConfigError
from transferbench.core.study import IDENTIFIER, default_label, load_saved_study, load_study, safe_yaml
from transferbench.report import document as report
from transferbench.report import plots

BASELINE = Path(__file__).parents[1] / "results" / "baselines" / "smoke"


# ------------------------------------------------------------- 1. the gate never passes what it cannot test ----

def nan_transfer(r):
    r.loc[r["arm"] == "transfer", "test_acc"] = np.nan


def nan_one_seed(r):
    r.loc[(r["arm"] == "transfer") & (r["seed"] == 1), "test_acc"] = np.nan


def nan_val(r):
    r.loc[r.index[:3], "val_acc"] = np.inf


def one_seed(r):
    return r[r["seed"] == 0]


def one_seed_and_a_collapse(r):
    r = r[r["seed"] == 0].copy()
    r.loc[r["arm"] == "transfer", "test_acc"] -= 0.4
    return r


def no_speed(r):
    r["images_per_second"] = np.nan


DROP = ("regressed anyway", lambda r: r.__setitem__("test_acc", r["test_acc"] - 0.3 * (r["arm"] == "transfer")))
# (case, edit of the base, edit of the new results, options, exit code, what the output must say)
GATE = [
    ("NaN test accuracy on every ok transfer cell", None, nan_transfer, [], 1,
     "UNTESTABLE: 96 cell(s) recorded ok in the new results have a val_acc/test_acc that is missing or not a number"),
    ("one NaN seed among four", None, nan_one_seed, [], 1, "UNTESTABLE: 24 cell(s) recorded ok in the new"),
    ("an infinite validation accuracy", None, nan_val, [], 1, "UNTESTABLE: 3 cell(s) recorded ok in the new"),
    ("one seed on both sides, transfer collapses by 40 pp", one_seed, one_seed_and_a_collapse, [], 1,
     "1 seed(s) in the base results (a t-test over seeds needs at least 2)"),
    ("one seed left in the new results", None, one_seed, [], 1,
     "1 seed(s) in the new results (a t-test over seeds needs at least 2)"),
    ("no images/s recorded in the new results", None, no_speed, [], 1,
     "UNTESTABLE: the speed of scratch could not be checked"),
    ("no weights digests in the new results", None, lambda r: r.drop(columns="weights_digest"), [], 2,
     "lacks columns ['weights_digest']"),
    ("no weights digests in the base", lambda r: r.drop(columns="weights_digest"), None, [], 2,
     "lacks columns ['weights_digest']"),
    ("a cell listed twice, its copy perfect", None, lambda r: pd.concat([r, r.assign(test_acc=1.0)]), [], 2,
     "holds 192 cell(s) twice"),
    ("an accuracy of 5", None, lambda r: r.assign(test_acc=r["test_acc"] + 4 * (r["arm"] == "transfer")), [], 1,
     "not a number in [0, 1]"),
    ("text in one test accuracy", None, lambda r: r.assign(test_acc=r["test_acc"].astype(object).where(
        r.index != 5, "oops")), [], 1, "UNTESTABLE: 1 cell(s) recorded ok in the new"),
    ("every val_acc of one point missing", None, lambda r: r.assign(val_acc=r["val_acc"].where(
        ~((r["arm"] == "transfer") & (r["target"] == "digits") & (r["n_per_class"] == 2)), np.nan)), [], 1,
     "UNTESTABLE: "),
    ("a key missing (lr) in the base", lambda r: r.assign(lr=r["lr"].where(r["arm"] != "transfer")), None, [], 2,
     "has rows without a value for ['lr']"),
    ("an infinite speed in the base", lambda r: r.assign(images_per_second=r["images_per_second"].where(
        r["arm"] != "transfer", np.inf)), None, [], 1, "UNTESTABLE: the speed of transfer could not be checked"),
    ("a cell still running, no error column", None, lambda r: r.assign(status=r["status"].where(
        r.index != 0, "running")).drop(columns="error"), [], 1, "1 cell(s) not recorded ok in the new results "
     "(status running; e.g. d6a2fe19befbad6e: no error recorded)"),
    ("--margin nan", None, DROP[1], ["--margin", "nan"], 2, "error: --margin: nan is outside [0, 0.25]"),
    ("--margin 0.99", None, DROP[1], ["--margin", "0.99"], 2, "--margin: 0.99 is outside [0, 0.25]"),
    ("--margin -0.1", None, DROP[1], ["--margin", "-0.1"], 2, "--margin: -0.1 is outside"),
    ("--fdr 0", None, DROP[1], ["--fdr", "0"], 2, "error: --fdr: 0 is outside [0.001, 0.5]"),
    ("--fdr 1e-300", None, DROP[1], ["--fdr", "1e-300"], 2, "error: --fdr: 1e-300 is outside"),
    ("--fdr 1", None, DROP[1], ["--fdr", "1"], 2, "error: --fdr: 1 is outside"),
    ("--speed-fraction 0", None, None, ["--speed-fraction", "0"], 2, "error: --speed-fraction: 0 is outside [0.1, 1]"),
    ("--speed-fraction 1e-300", None, None, ["--speed-fraction", "1e-300"], 2, "--speed-fraction: 1e-300 is outside"),
    ("--speed-fraction inf", None, None, ["--speed-fraction", "inf"], 2, "--speed-fraction: inf is outside"),
]


def copy_with(tmp: Path, side: str, edit) -> Path:
    folder = tmp / side
    folder.mkdir()
    runs = pd.read_csv(BASELINE / "runs.csv", dtype={"error": object})
    if edit:
        edited = edit(runs)
        runs = runs if edited is None else edited
    runs.to_csv(folder / "runs.csv", index=False)
    return folder


@pytest.mark.parametrize("case,edit_base,edit_new,options,code,expected", GATE, ids=[g[0] for g in GATE])
def test_the_gate_fails_or_refuses_what_it_cannot_test(tmp_path, capsys, case, edit_base, edit_new, options, code,
                                                       expected):
    base, new = copy_with(tmp_path, "base", edit_base), copy_with(tmp_path, "new", edit_new)
    assert main(["compare", str(base), str(new), *options]) == code
    out = capsys.readouterr()
    assert expected in out.out + out.err
    assert "no regression" not in out.out


def test_the_gate_still_passes_the_baseline_itself_and_its_noise(tmp_path, capsys):
    def noise(r):
        r["test_acc"] += np.random.default_rng(0).normal(0, 0.005, len(r)) * (r["arm"] != "pixels")

    assert main(["compare", str(BASELINE), str(copy_with(tmp_path, "new", noise))]) == 0
    assert capsys.readouterr().out.rstrip().endswith("no regression")


# ------------------------------------------------------------- 2. labels cannot break a table -------------------

HOSTILE_LABELS = ["a|b", "x\n", "$x^$", "back\\slash", "<img src=x onerror=alert(1)>", "two words", "_hidden",
                  "x" * 65, "new\nline|col"]


@pytest.mark.parametrize("label", HOSTILE_LABELS, ids=repr)
def test_a_hostile_name_is_refused(tmp_path, label):
    text = GOOD.replace("[{dataset: textures}]", f"[{{dataset: textures, name: {json.dumps(label)}}}]")
    with pytest.raises(ConfigError, match="not a plain identifier"):
        load_study(_write(tmp_path / "s.yaml", text))


@pytest.mark.parametrize("label", HOSTILE_LABELS, ids=repr)
def test_a_hostile_folder_name_becomes_a_plain_label(tmp_path, label):
    made = default_label("imagefolder", {"path": str(tmp_path / label)})
    assert IDENTIFIER.fullmatch(made), made


@pytest.mark.parametrize("value", ["a|b", "x\n|y", "a\\|b", "a\\\\|b", "$x^$", "r1\nr2", "|"], ids=repr)
def test_a_markdown_cell_never_moves_a_value_under_another_heading(value):
    import markdown

    table = report.markdown_table(pd.DataFrame({"target": [value, "plain"], "gain": [1.5, 2.5]}))
    html = markdown.markdown(table, extensions=["tables"])
    rows = html.split("<tr>")[1:]
    assert len(rows) == 3 and all(r.count("<td>") + r.count("<th>") == 2 for r in rows), html
    assert "<td>2.5</td>" in rows[2] and "<td>1.5</td>" in rows[1], html


def hostile_tables(label: str):
    """The committed smoke baseline's tables, with the target 'digits' renamed `label` everywhere."""
    t = tables.read_tables(load_saved_study(BASELINE), BASELINE)
    renamed = {key: value.assign(target=value["target"].replace("digits", label))
               for key, value in t.frames().items() if "target" in value.columns}
    t = dataclasses.replace(t, **renamed, order=[label if c == "digits" else c for c in t.order])
    return t, plots.make_style(t.runs, t.order, t.ordered_by)


@pytest.mark.parametrize("label", ["$x^$", "$\\alpha$", "back\\slash $y_1$", "a|b 50%_$"], ids=repr)
def test_every_figure_draws_and_saves_a_hostile_label_as_text(tmp_path, label):
    """'$x^$' made saving raise after every cell had trained; '$\\alpha$' was silently drawn as a Greek letter."""
    t, style = hostile_tables(label)
    drawn = 0
    for name, draw in plots.FIGURES.items():
        fig = draw(t, style)
        if fig is None:
            continue
        try:
            fig.savefig(io.BytesIO(), format="png")  # tick labels exist from here on
            texts = fig.findobj(plt.Text)
            assert not [x.get_text() for x in texts if x.get_parse_math() and x.get_text()], name
            drawn += 1
        finally:
            plt.close(fig)
        if name == "accuracy_vs_size":
            assert any(label in x.get_text() for x in texts)
    assert drawn >= 3


# ------------------------------------------------------------- 3. a key given twice ------------------------------

TWICE = [
    ("flow style", "train: {epochs: 1, epochs: 100000}\n", "s.yaml:5: key 'epochs' is given twice (columns"),
    ("block style", "run:\n  jobs: 1\n  jobs: 2\n", "key 'jobs' is given twice (lines 7 and 8)"),
    ("top level", "description: a\ndescription: b\n", "key 'description' is given twice (lines 6 and 7)"),
    ("inside a list entry", "backbones: [{model: tf_efficientnet_lite0, model: resnet18}]\n",
     "key 'model' is given twice"),
    ("inside a profile", "profiles:\n  fast: {train.epochs: 1, train.epochs: 2}\n",
     "key 'train.epochs' is given twice"),
    ("two merge keys", "x: &a {jobs: 1}\ny: &b {jobs: 2}\nrun: {<<: *a, <<: *b}\n", "merge key '<<' is given twice"),
]


@pytest.mark.parametrize("case,extra,expected", TWICE, ids=[t[0] for t in TWICE])
def test_a_key_given_twice_is_refused_naming_both_places(tmp_path, case, extra, expected):
    text = GOOD.replace("train: {epochs: 1}\n", "") + extra if "train:" in extra else GOOD + extra
    if case == "inside a list entry":
        text = GOOD.replace("backbones: [{model: tf_efficientnet_lite0, weights: imagenet}]\n", extra)
    with pytest.raises(ConfigError) as e:
        load_study(_write(tmp_path / "s.yaml", text))
    assert expected in str(e.value) and " -- fix: " in str(e.value)


def test_merge_keys_may_still_override_and_an_override_value_is_checked_too(tmp_path):
    assert safe_yaml("d: &d {x: 1, y: 2}\ne: {<<: *d, x: 3}\n", "m") == {"d": {"x": 1, "y": 2},
                                                                          "e": {"x": 3, "y": 2}}
    with pytest.raises(ConfigError, match="key 'seed' is given twice"):
        load_study(_write(tmp_path / "s.yaml", GOOD), ["grid={seed: [0], seed: [1]}"])


# ------------------------------------------------------------- 4. no write follows a planted link ----------------

def link_lock(tmp: Path):
    _write(tmp / "victim.txt", "precious\n")
    (tmp / "results" / "t").mkdir(parents=True)
    (tmp / "results" / "t" / ".lock").symlink_to(tmp / "victim.txt")


def link_folder(name: str):
    def plant(tmp: Path):
        (tmp / "outside").mkdir()
        (tmp / "results" / "t" / Path(name).parent).mkdir(parents=True, exist_ok=True)
        (tmp / "results" / "t" / name).symlink_to(tmp / "outside")
    return plant


def link_study_folder(tmp: Path):
    (tmp / "outside").mkdir()
    (tmp / "results").mkdir()
    (tmp / "results" / "t").symlink_to(tmp / "outside")


def hard_link_lock(tmp: Path):
    _write(tmp / "victim.txt", "precious\n")
    (tmp / "results" / "t").mkdir(parents=True)
    os.link(tmp / "victim.txt", tmp / "results" / "t" / ".lock")


def fifo_in_results(tmp: Path):
    (tmp / "results" / "t").mkdir(parents=True)
    os.mkfifo(tmp / "results" / "t" / "timing.txt")


LINKS = [(".lock", link_lock), ("a hard link as .lock", hard_link_lock), ("a FIFO as timing.txt", fifo_in_results),
         ("figures", link_folder("figures")), ("records", link_folder("records")),
         ("figures/old", link_folder("figures/old")), ("the study folder", link_study_folder)]


@pytest.mark.parametrize("case,plant", LINKS, ids=[c[0] for c in LINKS])
@pytest.mark.parametrize("command", ["study", "report"])
def test_no_write_follows_a_planted_link(tmp_path, capsys, case, plant, command):
    plant(tmp_path)
    if command == "report":
        if case == "the study folder":
            _write(tmp_path / "outside" / "study.resolved.yaml", GOOD)
        else:
            _write(tmp_path / "results" / "t" / "study.resolved.yaml", GOOD)
    outside = sorted(p.name for p in (tmp_path / "outside").iterdir()) if (tmp_path / "outside").exists() else []
    args = ["study", str(_write(tmp_path / "s.yaml", GOOD)), "--no-progress"] if command == "study" else ["report",
                                                                                                          "t"]
    assert main([*args, "--results", str(tmp_path / "results")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --results: ") and "fix: remove" in err
    assert "is a symbolic link" in err or "hard link" in err or "not a regular file or folder" in err
    if (tmp_path / "victim.txt").exists():
        assert (tmp_path / "victim.txt").read_text() == "precious\n"
    if (tmp_path / "outside").exists():
        assert sorted(p.name for p in (tmp_path / "outside").iterdir()) == outside


def test_a_folder_swapped_for_a_link_mid_run_is_refused_at_the_write(tmp_path):
    from transferbench.sweep.store import write_record

    (tmp_path / "outside").mkdir()
    (tmp_path / "records").symlink_to(tmp_path / "outside")
    with pytest.raises(ConfigError, match="is a symbolic link"):
        write_record(tmp_path / "records", {"study": "t", "cell_id": "x"})
    assert not list((tmp_path / "outside").iterdir())


# ------------------------------------------------------------- 5 and 6. exit 2 at planning, never a traceback ----

def checkpoint(tmp: Path, change) -> None:
    import timm
    import torch

    sd = timm.create_model("tf_efficientnet_lite0").state_dict()
    change(sd)
    torch.save(sd, tmp / "w.pth")


def extra_key(sd):
    import torch

    sd["extra.weight"] = torch.zeros(3)


def misshaped(sd):
    import torch

    sd["conv_stem.weight"] = torch.zeros(8, 3, 3, 3)


def missing_key(sd):
    sd.pop("conv_stem.weight")


def not_a_tensor(sd):
    sd["conv_stem.weight"] = 5


def a_nan(sd):
    sd["conv_stem.weight"][0, 0, 0, 0] = float("nan")


def truncated_safetensors(tmp: Path) -> None:
    import timm
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in timm.create_model("tf_efficientnet_lite0").state_dict().items()},
              tmp / "w.safetensors")
    data = (tmp / "w.safetensors").read_bytes()
    (tmp / "w.safetensors").write_bytes(data[: len(data) // 2])


def one_class(tmp: Path) -> None:
    write_folder(tmp / "data" / "only", classes=("only",))


def read_only_cache(tmp: Path) -> None:
    (tmp / "cache").mkdir()
    (tmp / "cache").chmod(stat.S_IRUSR | stat.S_IXUSR)
    os.environ["TRANSFERBENCH_CACHE"] = str(tmp / "cache")  # restored by the test


def target(text: str) -> str:
    return GOOD.replace("[{dataset: textures}]", text)


W = "weights: imagenet"
# (case, study text, setup, what the one-line error must say)
PLANNING = [
    ("truncated .safetensors", GOOD.replace(W, "weights: {tmp}/w.safetensors"), truncated_safetensors,
     "backbones.0.weights: {tmp}/w.safetensors cannot be read as safetensors"),
    ("checkpoint with an extra key", GOOD.replace(W, "weights: {tmp}/w.pth"), lambda t: checkpoint(t, extra_key),
     "1 unexpected keys (e.g. ['extra.weight'])"),
    ("checkpoint with a mis-shaped key", GOOD.replace(W, "weights: {tmp}/w.pth"), lambda t: checkpoint(t, misshaped),
     "1 shape mismatches (e.g. ['conv_stem.weight'])"),
    ("checkpoint missing a key", GOOD.replace(W, "weights: {tmp}/w.pth"), lambda t: checkpoint(t, missing_key),
     "1 missing keys (e.g. ['conv_stem.weight'])"),
    ("checkpoint holding a number, not a tensor", GOOD.replace(W, "weights: {tmp}/w.pth"),
     lambda t: checkpoint(t, not_a_tensor), "holds values that are not tensors (e.g. ['conv_stem.weight'])"),
    ("checkpoint holding a NaN", GOOD.replace(W, "weights: {tmp}/w.pth"), lambda t: checkpoint(t, a_nan),
     "holds non-finite values (NaN or inf) in 1 tensor(s)"),
    ("weights path that is a folder", GOOD.replace(W, "weights: {tmp}/dir.pth"), lambda t: (t / "dir.pth").mkdir(),
     "dir.pth is not a regular file"),
    ("weights path with a line break", GOOD.replace(W, 'weights: "a\\n## x.pth"'), None,
     "holds a control character"),
    ("a ViT at 32 px", GOOD.replace("tf_efficientnet_lite0, weights: imagenet", "vit_tiny_patch16_224, weights: none"),
     None, "train.image_size: vit_tiny_patch16_224 cannot take 32 px inputs"),
    ("glyphs at 1 px", target("[{dataset: glyphs, options: {size: 1}}]"), None,
     "targets.0.options.size: dataset 'glyphs': 1 is not a valid size (input should be greater than or equal to 8)"),
    ("steps: 1e19", GOOD.replace("epochs: 1", "steps: 10000000000000000000"), None,
     "train.steps: Input should be less than or equal to 1000000"),
    ("validations beyond bound", GOOD.replace("epochs: 1", "steps: 1000000, eval_every: 1"), None,
     "would validate more than 100,000 times"),
    ("a profile that is not a mapping", GOOD + "profiles: {fast: 3}\n", None, "profiles: must map each profile"),
    ("one field overridden twice", GOOD, None, "override train.epochs: overlaps 'train.epochs' given before it"),
    ("scratch.budget_factor: .inf", GOOD + "scratch: {budget_factor: .inf}\n", None,
     "scratch.budget_factor: Input should be a finite number"),
    ("scratch.budget_factor: 1e300", GOOD + "scratch: {budget_factor: 1e300}\n", None,
     "scratch.budget_factor: Input should be less than or equal to 100"),
    ("lr: .inf", GOOD.replace("epochs: 1", "epochs: 1, lr: .inf"), None, "train.lr: Input should be a finite number"),
    ("lrs: [.nan]", GOOD.replace("epochs: 1", "epochs: 1, lrs: [.nan]"), None, "train.lrs.0: Input should be a finite"),
    ("lrs: []", GOOD.replace("epochs: 1", "epochs: 1, lrs: []"), None, "train.lrs: List should have at least 1 item"),
    ("scratch.lrs: []", GOOD + "scratch: {lrs: []}\n", None, "scratch.lrs: List should have at least 1 item"),
    ("seed 2**64", GOOD.replace("seed: [0, 1]", "seed: [18446744073709551616]"), None,
     "grid.seed.0: Input should be less than or equal to 4294967295"),
    ("options.path: 5", target("[{dataset: imagefolder, options: {path: 5}}]"), None,
     "targets.0.options.path: dataset 'imagefolder': 5 is not a valid path"),
    ("options.store_size: 0", target("[{dataset: imagefolder, options: {path: {tmp}/data/imgs, store_size: 0}}]"),
     lambda t: write_folder(t / "data" / "imgs"), "targets.0.options.store_size: dataset 'imagefolder': 0 is not"),
    ("options.download: 'yes'", target("[{dataset: cifar10, options: {root: {tmp}, download: 'yes'}}]"), None,
     "targets.0.options.download: dataset 'cifar10': 'yes' is not a valid download"),
    ("an ImageFolder with one class", target("[{dataset: imagefolder, options: {path: {tmp}/data/only}}]"),
     one_class, "targets.0: 'only' has 1 class(es) ['only']: a classification target needs at least 2"),
    ("a read-only cache folder", GOOD, read_only_cache, "TRANSFERBENCH_CACHE: {tmp}/cache is read-only"),
    ("image_size 4096", GOOD.replace("epochs: 1", "epochs: 1, image_size: 4096"), None,
     "train.image_size: 4096 px needs at least"),
    ("override through a list entry", GOOD, None, "'backbones' is a list: one of its entries cannot be overridden"),
]


@pytest.mark.parametrize("case,text,setup,expected", PLANNING, ids=[p[0] for p in PLANNING])
def test_bad_input_is_refused_at_planning(tmp_path, capsys, monkeypatch, case, text, setup, expected):
    monkeypatch.setenv("TRANSFERBENCH_CACHE", os.environ["TRANSFERBENCH_CACHE"])  # restored after the test
    extra = {"override through a list entry": ["backbones.0.weights=none"], "a profile that is not a mapping": [
        "--profile", "fast"], "one field overridden twice": ["train.epochs=2", "train.epochs=3"]}.get(case, [])
    try:
        err, untouched, nothing_beside = refuse(tmp_path, capsys, text, extra, setup)
    finally:
        if (tmp_path / "cache").exists():
            (tmp_path / "cache").chmod(0o755)
    assert expected.replace("{tmp}", str(tmp_path)) in err.splitlines()[0], err
    assert len(err.strip().splitlines()) == 1, err
    assert untouched, "a cell ran: the refusal came too late"


def fifo(tmp: Path) -> Path:
    os.mkfifo(tmp / "s.yaml")
    return tmp / "s.yaml"


def device(tmp: Path) -> Path:
    (tmp / "s.yaml").symlink_to("/dev/zero")
    return tmp / "s.yaml"


@pytest.mark.parametrize("make", [fifo, device])
def test_a_study_file_that_is_not_a_regular_file_is_refused_without_reading_it(tmp_path, capsys, make):
    assert main(["study", str(make(tmp_path)), "--results", str(tmp_path / "r")]) == 2  # a read would block
    assert "a study file must be a regular file" in capsys.readouterr().err


def edited(field: str, value: str):
    def edit(folder: Path) -> None:
        path = folder / "study.resolved.yaml"
        path.write_text(path.read_text().replace(field, value, 1))
    return edit


def compare_edit(edit):
    def run(tmp: Path) -> list[str]:
        return ["compare", str(BASELINE), str(copy_with(tmp, "new", edit))]
    return run


# (case, the command's arguments given a tmp folder, what the one-line error must say)
TRACEBACKS = [
    ("compare: an all-NaN runs.csv", compare_edit(lambda r: r.assign(test_acc=np.nan, val_acc=np.nan)),
     "has no cell recorded ok with valid accuracies"),
    ("compare: a runs.csv without 'weights'", compare_edit(lambda r: r.drop(columns="weights")),
     "lacks columns ['weights']"),
    ("compare: a runs.csv without 'n_per_class'", compare_edit(lambda r: r.drop(columns="n_per_class")),
     "lacks columns ['n_per_class']"),
    ("compare: a base of one row", lambda tmp: ["compare", str(copy_with(tmp, "base", lambda r: r.head(1))),
                                                str(BASELINE)], "has no grid point with both a transfer and a scratch"),
    ("compare: a runs.csv that is a folder", lambda tmp: ["compare", str(BASELINE), str(
        (tmp / "new" / "runs.csv").mkdir(parents=True) or tmp / "new")], "runs.csv is not a regular file"),
]


@pytest.mark.parametrize("case,args,expected", TRACEBACKS, ids=[t[0] for t in TRACEBACKS])
def test_bad_tables_are_refused_in_one_line(tmp_path, capsys, case, args, expected):
    assert main(args(tmp_path)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and expected in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("field,value", [("steps: 30", "steps: -4"), ("patience: 2", "patience: many"),
                                         ("lr: 0.003", "lr: .inf")])
def test_report_refuses_an_edited_resolved_study(tmp_path, capsys, field, value):
    shutil.copytree(BASELINE, tmp_path / "smoke")
    edited(field, value)(tmp_path / "smoke")
    assert field.split(":")[0] in (tmp_path / "smoke" / "study.resolved.yaml").read_text()
    assert main(["report", "smoke", "--results", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "study.resolved.yaml" in err and "do not edit study.resolved.yaml" in err


# ------------------------------------------------------------- 7. errors say the true cause ---------------------

def test_a_class_of_five_images_gets_an_image_in_every_split(tmp_path):
    from transferbench.data.external import image_folder

    for n in (3, 4, 5, 6, 7):
        raw = image_folder(str(write_folder(tmp_path / f"n{n}", per_class=n, seed=n)), store_size=8)
        sizes = [np.bincount(raw.splits[s][1], minlength=3).tolist() for s in ("train", "val", "test")]
        assert sum(sum(s) for s in sizes) == 3 * n and all(min(s) >= 1 for s in sizes), (n, sizes)


def test_the_split_rule_is_unchanged_where_it_gave_every_split_an_image():
    from transferbench.data.raw import cut_points

    for n in range(3, 3000):
        a, b = int(n * 0.6), int(n * 0.75)
        if a < b < n:
            assert cut_points(n, (0.6, 0.15)) == (a, b), n
        assert cut_points(n, (0.9, 0.1)) == (int(n * 0.9), n), n  # carving val: no image is dropped


def results_file(tmp: Path) -> None:
    (tmp / "results").rmdir()
    (tmp / "results").write_text("a file\n")


def record_folder(tmp: Path) -> None:
    from transferbench.sweep.planning import plan

    cell = plan(load_study(_write(tmp / "plan.yaml", GOOD)))[0]
    (tmp / "results" / "t" / "records" / f"{cell.cell_id}.json").mkdir(parents=True)


WORDS = [("--results is a file", results_file, "is a file, not a folder"),
         ("a record's path is a folder", record_folder, "not a regular file -- fix: move it away")]


@pytest.mark.parametrize("case,setup,expected", WORDS, ids=[w[0] for w in WORDS])
def test_the_error_names_the_true_cause(tmp_path, capsys, case, setup, expected):
    (tmp_path / "results").mkdir()
    setup(tmp_path)
    assert main(["study", str(_write(tmp_path / "s.yaml", GOOD)), "--results", str(tmp_path / "results"),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert expected in err and "disk space" not in err, err


@pytest.mark.parametrize("code,expected", [(errno.ENOSPC, "free disk space"), (errno.EACCES, "permissions"),
                                           (errno.ENOTDIR, "a file stands where a folder is needed"),
                                           (errno.EISDIR, "a folder stands where a file is written"),
                                           (errno.EROFS, "writable file system"), (errno.ELOOP, "symbolic link")])
def test_an_io_error_gets_the_fix_for_its_cause(code, expected):
    from transferbench.cli import os_error_fix

    fix = os_error_fix(OSError(code, os.strerror(code), "/r/t/x"))
    assert expected in fix
    assert code == errno.ENOSPC or "disk space" not in fix
