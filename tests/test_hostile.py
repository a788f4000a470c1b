"""Hostile input and data integrity (issue: no silent wrong numbers, no escape from the results folder).

Each case states the exit code and the first line the user sees; the results folder is left untouched.
"""

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_bad_input import refuse

from transferbench.cli import main
from transferbench.core.errors import ConfigError
from transferbench.core.study import Cell, load_study
from transferbench.sweep.store import read_records, remove_orphans, write_record

GOOD = """name: t
backbones: [{model: tf_efficientnet_lite0, weights: imagenet}]
targets: [{dataset: textures}]
grid: {frozen_depth: [0, all], n_per_class: [2], schedule: [constant], seed: [0, 1]}
train: {epochs: 1}
"""
BOMB = """a: &a ["x","x","x","x","x","x","x","x","x"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]
"""


def write_folder(root: Path, classes=("cat", "dog", "fox"), per_class=12, invert=False, seed=0) -> Path:
    rng = np.random.default_rng(seed)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            a = rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)
            Image.fromarray(255 - a if invert else a).save(root / c / f"{i}.png")
    return root


def done_record(tmp: Path, study_text: str = GOOD) -> tuple[Path, dict]:
    """A genuine record of one of the study's cells, as a worker writes it."""
    from transferbench.core.study import expand

    cell = expand(load_study(_write(tmp / "s.yaml", study_text)))[0]
    record = dict(study="t", cell_id=cell.cell_id, **cell.model_dump(), status="ok", error=None, test_acc=0.31,
                  val_acc=0.3)
    path = write_record(tmp / "results" / "t" / "records", record)
    return path, record


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def edited_seed(tmp: Path):
    path, record = done_record(tmp)
    record |= {"seed": 7, "test_acc": 0.99}  # the cell_id kept: the finding's hand edit
    path.write_text(json.dumps(record))


def edited_accuracy(tmp: Path):
    path, record = done_record(tmp)
    path.write_text(path.read_text().replace('"test_acc": 0.31', '"test_acc": 0.99'))


def truncated_domains(tmp: Path):
    _write(tmp / "results" / "t" / "domains.csv",
           "backbone,weights,target,fd,mmd,pad,logme\nlite0,imagenet,textures,1.")


# (case, study text, extra CLI args, setup, what stderr's first line must hold)
CASES = [
    ("name with ../", GOOD.replace("name: t", "name: ../escaped"), [], None, "study.yaml: name: Value error"),
    ("absolute name", GOOD.replace("name: t", "name: /tmp/escaped"), [], None, "study.yaml: name: Value error"),
    ("markup in name", GOOD.replace("name: t", "name: '<img src=x onerror=alert(1)>'"), [], None,
     "study.yaml: name: Value error"),
    ("alias bomb", BOMB + GOOD, [], None, "study.yaml: YAML expands to more than 100,000 nodes"),
    ("alias bomb in an unused profile", GOOD + "profiles:\n  huge:\n" + "".join("    " + line + "\n" for line in
                                                                                 BOMB.splitlines()), [], None,
     "study.yaml: YAML expands to more than 100,000 nodes"),
    ("file too large", GOOD + "#" + "x" * (1 << 20) + "\n", [], None, "study.yaml: study file is"),
    ("grid too large", GOOD.replace("seed: [0, 1]", f"seed: {list(range(20000))}").replace(
        "n_per_class: [2]", "n_per_class: [1, 2, 3, 4]"), [], None, "study.yaml: (top level): Value error"),
    ("two targets with one name", GOOD.replace("[{dataset: textures}]",
                                               "[{dataset: textures}, {dataset: digits, name: textures}]"), [], None,
     "study.yaml: targets: Value error"),
    ("record edited: seed", GOOD, [], edited_seed, "record "),
    ("record edited: accuracy", GOOD, [], edited_accuracy, "record "),
]
DETAIL = {  # what the rest of the message must say, beyond its first words
    "name with ../": "not a plain identifier", "absolute name": "not a plain identifier",
    "markup in name": "not a plain identifier", "grid too large": "above run.max_cells = 100,000",
    "two targets with one name": "two targets are both named ['textures']",
    "record edited: seed": "hashes to", "record edited: accuracy": "does not match its checksum",
}


@pytest.mark.parametrize("case,text,extra,setup,expected", CASES, ids=[c[0] for c in CASES])
def test_hostile_input_is_refused_in_one_line(tmp_path, capsys, case, text, extra, setup, expected):
    err, untouched, nothing_beside = refuse(tmp_path, capsys, text, extra, setup)
    assert expected in err.splitlines()[0] and DETAIL.get(case, "") in err
    assert untouched, "the results folder was touched"
    assert nothing_beside and not Path("/tmp/escaped").exists(), "something was written outside the results folder"
    assert not (tmp_path / "results" / "t" / ".lock").exists()


def test_bad_yaml_is_refused_fast_without_importing_torch(tmp_path):
    """Validation happens before torch is imported: an alias bomb costs well under a second and no memory."""
    study = _write(tmp_path / "s.yaml", BOMB + GOOD)
    # VmHWM (peak resident memory, KiB) starts afresh at exec, unlike ru_maxrss, which a forked child inherits.
    code = ("import re, sys; from transferbench.cli import main; rc = main(['study', sys.argv[1], '--results', "
            "sys.argv[2]]); print(rc, 'torch' in sys.modules, re.search(r'VmHWM:\\s+(\\d+)', "
            "open('/proc/self/status').read()).group(1))")
    out = subprocess.run([sys.executable, "-c", code, str(study), str(tmp_path / "r")], capture_output=True, text=True,
                         timeout=60).stdout.split()
    assert out[:2] == ["2", "False"], out
    assert int(out[2]) < 300_000, f"{int(out[2]) / 1024:.0f} MiB to refuse a bad file"


def test_report_refuses_a_path_as_study_name(tmp_path, capsys):
    assert main(["report", "../etc", "--results", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("error: study name: '../etc' would write outside")


# ------------------------------------------------------------------- caches keyed by content -------------

def test_two_image_folders_never_share_cached_data_or_features(tmp_path):
    from transferbench.data import load_target
    from transferbench.models.backbones import create_backbone
    from transferbench.models.features import prefix_key

    a = write_folder(tmp_path / "a" / "photos")
    b = write_folder(tmp_path / "b" / "inverted", invert=True)
    ta = load_target("imagefolder", None, 0, 16, {"path": str(a), "store_size": 16}, "photos")
    tb = load_target("imagefolder", None, 0, 16, {"path": str(b), "store_size": 16}, "inverted")
    assert not np.allclose(ta.x["train"].numpy(), tb.x["train"].numpy())
    assert ta.key != tb.key and ta.name == "photos" and tb.name == "inverted"
    bb = create_backbone("tf_efficientnet_lite0", "imagenet", 3, 0)
    assert prefix_key("tf_efficientnet_lite0", bb, 8, ta.key, 16) != prefix_key("tf_efficientnet_lite0", bb, 8,
                                                                                  tb.key, 16)


def test_editing_a_folder_invalidates_its_cached_arrays(tmp_path):
    from transferbench.data import load_raw

    root = write_folder(tmp_path / "imgs")
    options = {"path": str(root), "store_size": 16}
    first = load_raw("imagefolder", options)
    rng = np.random.default_rng(99)
    for c in ("cat", "dog", "fox"):  # five more images per class
        for i in range(12, 17):
            Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    second = load_raw("imagefolder", options)
    def count(raw):
        return sum(len(raw.splits[s][1]) for s in raw.splits)

    assert count(second) == count(first) + 15


def test_image_folders_are_named_by_their_folder_and_names_must_differ(tmp_path):
    one = write_folder(tmp_path / "x" / "scans")
    two = write_folder(tmp_path / "y" / "scans", seed=1)
    text = GOOD.replace("[{dataset: textures}]", f"[{{dataset: imagefolder, options: {{path: {one}}}}}]")
    assert load_study(_write(tmp_path / "s.yaml", text)).targets[0].condition == "scans"
    clash = GOOD.replace("[{dataset: textures}]", f"[{{dataset: imagefolder, options: {{path: {one}}}}}, "
                                                  f"{{dataset: imagefolder, options: {{path: {two}}}}}]")
    with pytest.raises(ConfigError, match=r"two targets are both named \['scans'\]"):
        load_study(_write(tmp_path / "s.yaml", clash))
    named = clash.replace(f"options: {{path: {two}}}}}", f"options: {{path: {two}}}, name: scans_b}}")
    assert [t.condition for t in load_study(_write(tmp_path / "s.yaml", named)).targets] == ["scans", "scans_b"]


def test_a_damaged_data_cache_is_rebuilt_and_named(tmp_path, capsys, monkeypatch):
    from transferbench.core.paths import cache_dir
    from transferbench.data import load_raw

    monkeypatch.setenv("TRANSFERBENCH_CACHE", str(tmp_path))
    good = load_raw("digits")
    path = next(cache_dir("data").glob("digits-*.npz"))
    for damage in (lambda b: b[: len(b) // 2], lambda b: b[:-4000] + bytes(4000)):
        path.write_bytes(damage(path.read_bytes()))
        again = load_raw("digits")
        assert f"data cache {path} is damaged" in capsys.readouterr().err
        assert all(np.array_equal(good.splits[s][0], again.splits[s][0]) for s in good.splits)


def test_a_zeroed_feature_cache_file_is_recomputed_not_used(tmp_path, capsys):
    import torch

    from transferbench.models.features import FeatureCache

    feats = {"train": torch.randn(8, 4)}
    cache = FeatureCache(tmp_path)
    cache.get("k", lambda: feats)
    path = tmp_path / "k.safetensors"
    raw = bytearray(path.read_bytes())
    raw[-32:] = bytes(32)  # the data zeroed in place, the length kept
    path.write_bytes(bytes(raw))
    got, where = FeatureCache(tmp_path).get("k", lambda: feats)
    assert where == "miss" and torch.equal(got["train"], feats["train"])
    assert "is damaged (content does not match its digest)" in capsys.readouterr().err


# ------------------------------------------------------------------- records, orphans, full disks --------

def test_orphan_temporary_records_are_ignored_then_removed(tmp_path):
    _, record = done_record(tmp_path)
    records = tmp_path / "results" / "t" / "records"
    (records / ".tmp-abc123.json").write_text('{"cell_id": "trunc')
    assert list(read_records(records)) == [record["cell_id"]]
    assert remove_orphans(records) == 1 and not list(records.glob(".tmp-*"))


def test_a_full_disk_while_writing_a_record_leaves_nothing_half_written(tmp_path, monkeypatch):
    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(OSError):
        done_record(tmp_path)
    assert list((tmp_path / "results" / "t" / "records").iterdir()) == []


def test_a_full_disk_mid_study_ends_with_one_line(tmp_path, capsys, monkeypatch):
    import transferbench.sweep.runner as runner

    def no_space(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "results" / "t" / "records" / "x"))

    monkeypatch.setattr(runner, "run_cells", no_space)
    assert main(["study", str(_write(tmp_path / "s.yaml", GOOD)), "--results", str(tmp_path / "results"),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "No space left on device -- fix: free disk space" in err


def test_compare_on_an_empty_table_is_bad_input(tmp_path, capsys):
    for side in ("base", "new"):
        _write(tmp_path / side / "runs.csv", "")
        _write(tmp_path / side / "gains.csv", "")
    assert main(["compare", str(tmp_path / "base"), str(tmp_path / "new")]) == 2
    assert capsys.readouterr().err.startswith("error: compare: ")


def test_a_truncated_domains_table_is_never_used(tmp_path):
    from transferbench.sweep.store import read_domains

    truncated_domains(tmp_path)
    assert read_domains(tmp_path / "results" / "t") is None


def test_report_waits_for_no_one_and_refuses_a_locked_folder(tmp_path, capsys):
    from transferbench.core.study import save_study
    from transferbench.sweep.runner import results_lock

    out = tmp_path / "t"
    save_study(load_study(_write(tmp_path / "s.yaml", GOOD)), out)
    with results_lock(out):
        assert main(["report", "t", "--results", str(tmp_path)]) == 2
    assert "another transferbench run holds" in capsys.readouterr().err
    assert main(["report", "t", "--results", str(tmp_path)]) == 2  # unlocked, but no cell has finished
    err = capsys.readouterr().err
    assert err.startswith("error: study: no cell of 't' has a record") and len(err.splitlines()) == 1


# ------------------------------------------------------------------- training edge cases -----------------

def test_a_last_batch_of_one_joins_the_batch_before(torch_single_thread):
    from transferbench.models.features import FeatureCache
    from transferbench.training.cell import train_cell
    from transferbench.training.loop import batch_bounds

    assert batch_bounds(33, 32) == [(0, 33)]
    assert batch_bounds(65, 32) == [(0, 32), (32, 65)]
    assert batch_bounds(34, 32) == [(0, 32), (32, 34)]
    # 10 classes x 3 = 30 examples in batches of 29: the last batch would hold one example.
    cell = Cell(arm="scratch", model="tf_efficientnet_lite0", weights="none", dataset="digits", shift=None, severity=0,
                frozen_depth=0, n_per_class=3, schedule="constant", lr=1e-3, seed=0, epochs=1, batch_size=29,
                image_size=32, optimizer="adamw", weight_decay=0.0, augment=False, device="cpu", amp=False,
                channels_last=True)
    r = train_cell(cell, FeatureCache())
    assert r["images_seen"] == 30 and 0 <= r["test_acc"] <= 1


def test_per_target_sizes_are_honoured():
    from transferbench.core.study import expand, n_cells

    text = GOOD.replace("[{dataset: textures}]", "[{dataset: textures, n_per_class: [1, 3, 5]}, {dataset: digits}]")
    study = load_study(_write(Path(os.environ["TRANSFERBENCH_CACHE"]) / "sizes.yaml", text))
    cells = expand(study)
    assert sorted({c.n_per_class for c in cells if c.dataset == "textures"}) == [1, 3, 5]
    assert sorted({c.n_per_class for c in cells if c.dataset == "digits"}) == [2]
    assert len(cells) == n_cells(study)
