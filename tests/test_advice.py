"""The advise predictor: jackknife+ by hand, a known relation recovered with intervals that cover, the JSON round
trip, and the command's refusals."""

import json

import numpy as np
import pandas as pd
import pytest

from transferbench.analysis import advice


def synthetic(n_datasets=8, per_dataset=6, noise=0.02, dataset_sd=0.02, informative=True, seed=0) -> pd.DataFrame:
    """Rows whose gain falls linearly with a distance (fd) and rises with kNN accuracy, plus a per-dataset offset and
    noise; a second tuning gains 5 pp less. Sizes 4 and 16, 10 classes."""
    r = np.random.default_rng(seed)
    out = []
    for d in range(n_datasets):
        offset = r.normal(0, dataset_sd)
        for c in range(per_dataset):
            fd, knn = r.uniform(0, 100), r.uniform(0.1, 0.9)
            for n in (4, 16):
                for tuning, shift in (("frozen 0", 0.0), ("probe (all)", -0.05)):
                    signal = 0.3 - 0.003 * fd + 0.2 * knn - 0.02 * np.log2(n) if informative else 0.1
                    gain = signal + shift + offset + r.normal(0, noise)
                    out.append(dict(backbone="b", weights="w", target=f"d{d}c{c}", dataset=f"d{d}", tuning=tuning,
                                    n_per_class=n, fd=fd, knn_acc=knn, gain=gain, transfer_mean=0.5 + gain / 2,
                                    eff_log2=1 + 4 * gain, log2_n=np.log2(n), log2_classes=np.log2(10)))
    return pd.DataFrame(out)


def test_jackknife_plus_interval_by_hand():
    """Two left-out models predicting 0 and 1 with residuals {1, 2} and {3}: at level 1/2, n = 3, the lower end is
    the floor(0.5 * 4) = 2nd smallest of {-1, -2, -2} and the upper the ceil(0.5 * 4) = 2nd smallest of {1, 2, 4}."""
    def const(v):
        return advice.Ridge(["x"], ["t"], [0.0], [1.0], 1.0, [0.0], [v])

    j = advice.Jackknife("gain", const(0.5), {"a": const(0.0), "b": const(1.0)}, {"a": [1.0, 2.0], "b": [3.0]})
    point, lo, hi = j.predict(np.zeros((1, 1)), np.array(["t"]), 0.5)
    assert point[0] == 0.5 and lo[0] == -2.0 and hi[0] == 2.0
    _, lo, hi = j.predict(np.zeros((1, 1)), np.array(["t"]), 0.9)  # ceil(0.9 * 4) = 4 > n: unbounded above
    assert hi[0] == np.inf and lo[0] == -np.inf


def test_a_known_relation_is_recovered_with_intervals_that_cover():
    table = synthetic()
    p = advice.fit(table, source={})
    v = p.validation["gain"]["measures"]
    assert v["datasets"] == 8 and v["n"] == len(table)
    assert v["mae"] < 0.04  # noise 0.02 plus a dataset offset of sd 0.02: about 0.025 expected
    assert 0.65 <= v["coverage80"] <= 0.97 and 0.8 <= v["coverage90"] <= 1.0
    assert p.validation["gain"]["beats_trivial"] and p.validation["gain"]["trivial"]["mae"] > 2 * v["mae"]
    new = synthetic(n_datasets=1, seed=9)
    found = p.predict(new)
    assert np.abs(found["gain"] - new["gain"]).mean() < 0.05
    assert (found["gain_lo90"] <= found["gain_lo80"]).all() and (found["gain_hi80"] <= found["gain_hi90"]).all()


def test_measures_that_carry_nothing_fall_back_to_the_trivial_predictor():
    table = synthetic(informative=False, dataset_sd=0.0)
    p = advice.fit(table, source={})
    assert not p.validation["gain"]["beats_trivial"]
    assert set(p.predict(table)["gain_model"]) == {"trivial"}


def test_a_tuning_seen_on_too_few_base_datasets_is_not_predicted():
    table = synthetic()
    rare = table[(table["dataset"] == "d0") & (table["tuning"] == "frozen 0")].assign(tuning="frozen 6")
    p = advice.fit(pd.concat([table, rare]), source={})
    assert "frozen 6" not in p.tunings and set(p.tunings) == {"frozen 0", "probe (all)"}


def test_the_predictor_survives_its_json():
    p = advice.fit(synthetic(), source=dict(folders=["x"]))
    again = advice.Predictor.from_json(json.loads(json.dumps(p.to_json())))
    table = synthetic(n_datasets=1, seed=3)
    pd.testing.assert_frame_equal(p.predict(table), again.predict(table))
    with pytest.raises(ValueError, match="format"):
        advice.Predictor.from_json(p.to_json() | {"format": 0})


@pytest.mark.parametrize("argv,field", [
    (["advise", "textures", "--sizes", "0"], "--sizes"),
    (["advise", "textures", "--sizes", "two"], "--sizes"),
    (["advise", "textures", "--accuracy", "80"], "--accuracy"),
    (["advise"], "DATA"),
    (["advise", "textrues"], "DATA"),
    (["advise", "/no/such/folder"], "DATA"),
    (["advise", "textures", "--shift", "solarize"], "--severity"),
    (["advise", "textures", "--shift", "solarize", "--severity", "9"], "--severity"),
    (["advise", "textures", "--shift", "blurr", "--severity", "2"], "DATA"),
    (["advise", "textures", "--backbone", "resnet50"], "--backbone"),
])
def test_advise_refuses_bad_arguments_in_one_line(argv, field, capsys):
    from transferbench.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {field}:") and "fix:" in err and err.count("\n") == 1


def test_advise_refuses_a_folder_without_a_predictor(tmp_path, capsys):
    from transferbench.cli import main

    assert main(["advise", "textures", "--from", str(tmp_path)]) == 2
    assert "no predictor.json" in capsys.readouterr().err


def test_advise_end_to_end_on_a_tiny_image_folder(tmp_path, capsys):
    """A predictor fitted on synthetic rows carrying the real measures' names, then `advise FOLDER` through the CLI:
    the real backbone measures the folder, and advice.md / advice.json come back with intervals and the validation."""
    from test_external import write_image_folder

    from transferbench.advise import save_predictor
    from transferbench.cli import main
    from transferbench.measures import measures

    r = np.random.default_rng(0)
    table = synthetic().assign(backbone="tf_efficientnet_lite0", weights="imagenet")
    for m in measures():
        table[m] = table.get(m, pd.Series(r.normal(size=len(table)), index=table.index))
    p = advice.fit(table, source=dict(folders=["synthetic"], studies=["synthetic"], image_size=32, seeds=[0, 1],
                                      backbones=[["tf_efficientnet_lite0", "imagenet"]], rows=len(table),
                                      conditions=int(table["target"].nunique()), base_datasets=["d0", "d1"]))
    (tmp_path / "fitted").mkdir()
    save_predictor(p, tmp_path / "fitted")
    write_image_folder(tmp_path / "shapes", per_class=20)
    argv = ["advise", str(tmp_path / "shapes"), "--from", str(tmp_path / "fitted"), "--results",
            str(tmp_path / "results"), "--sizes", "2,4", "--accuracy", "0.5", "--no-progress"]
    assert main(argv) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "tf_efficientnet_lite0 at 2 per class:" in printed and "advice.md" in printed
    out = tmp_path / "results" / "advice" / "shapes"
    found = json.loads((out / "advice.json").read_text())
    rows = pd.DataFrame(found["predictions"])
    assert set(rows["n_per_class"]) == {2, 4} and set(rows["tuning"]) == {"frozen 0", "probe (all)"}
    assert (rows["gain_lo90"] <= rows["gain"]).all() and (rows["gain"] <= rows["gain_hi90"]).all()
    report = (out / "advice.md").read_text()
    assert "## Predictions" in report and "leave one base dataset out" in report and "80% coverage" in report
    assert main(argv[:-3] + ["--sizes", "999", "--no-progress"]) == 2  # more than the folder holds per class
    assert "--sizes:" in capsys.readouterr().err
