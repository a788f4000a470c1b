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


def test_jackknife_plus_ranks_are_exact_where_a_times_n_plus_1_is_whole():
    """Nine residuals 1..9 around a zero prediction at level 0.9: floor(0.1 x 10) = 1, so the lower end is the
    smallest of -R_i (-9), never -inf (1 - 0.9 is 0.0999...98 in floating point); the upper end, the ceil(0.9 x 10)
    = 9th smallest of +R_i, is 9."""
    zero = advice.Ridge(["x"], ["t"], [0.0], [1.0], 1.0, [0.0], [0.0])
    j = advice.Jackknife("gain", zero, {"a": zero, "b": zero}, {"a": [1.0, 2.0, 3.0, 4.0], "b": [5.0, 6, 7, 8, 9]})
    _, lo, hi = j.predict(np.zeros((1, 1)), np.array(["t"]), 0.9)
    assert lo[0] == -9.0 and hi[0] == 9.0


def test_an_outcome_missing_for_a_tuning_gives_open_intervals_not_nan():
    """Effective data missing for the probe on all but three base datasets: each left-out model that lacks the probe
    opens its side of the interval instead of turning it into NaN."""
    table = synthetic()
    rare = (table["tuning"] == "probe (all)") & ~table["dataset"].isin(["d0", "d1", "d2"])
    table.loc[rare, "eff_log2"] = np.nan
    p = advice.fit(table, source={})
    found = p.predict(synthetic(n_datasets=1, seed=5))
    for col in ("eff_log2", "eff_log2_lo80", "eff_log2_hi80", "eff_log2_lo90", "eff_log2_hi90"):
        assert not found[col].isna().any(), col


def test_rows_join_gains_with_the_measures_at_each_size():
    """rows(): distances per (backbone, target), estimators per (backbone, target, size) averaged over seeds, the
    trivial features and log2 effective data."""
    gains = pd.DataFrame(dict(backbone="b", weights="w", target=["t1", "t1", "t2"], tuning="frozen 0",
                              n_per_class=[4, 16, 4], gain=[0.1, 0.05, 0.2], transfer_mean=0.5,
                              eff_multiplier=[2.0, 1.0, 4.0]))
    domains = pd.DataFrame(dict(backbone="b", weights="w", target=["t1", "t2"], dataset=["d1", "d2"], fd=[1.0, 2.0]))
    est = pd.DataFrame(dict(backbone="b", weights="w", target=["t1"] * 4 + ["t2"] * 2, n_per_class=[4, 4, 16, 16, 4, 4],
                            seed=[0, 1, 0, 1, 0, 1], knn_acc=[0.2, 0.4, 0.6, 0.8, 0.1, 0.3]))
    r = advice.rows(gains, domains, est, pd.Series({"t1": 4, "t2": 8})).set_index(["target", "n_per_class"])
    assert r.loc[("t1", 4), "knn_acc"] == pytest.approx(0.3) and r.loc[("t1", 16), "knn_acc"] == pytest.approx(0.7)
    assert r.loc[("t2", 4), "fd"] == 2.0 and r.loc[("t2", 4), "dataset"] == "d2"
    assert r.loc[("t1", 16), "log2_n"] == 4 and r.loc[("t2", 4), "log2_classes"] == 3
    assert r.loc[("t2", 4), "eff_log2"] == 2.0 and len(r) == 3


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
    assert ((found["gain_lo80"] <= new["gain"]) & (new["gain"] <= found["gain_hi80"])).mean() >= 0.6


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
    (["advise", "textures", "--shift", "blurr", "--severity", "2"], "--shift"),
    (["advise", "textures", "--sizes", "999"], "--sizes"),
    (["advise", "textures", "--fit", "results/baselines/domain_gap", "--from", "x"], "--from"),
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
    def strict(token):
        raise ValueError(f"{token} is not JSON")

    found = json.loads((out / "advice.json").read_text(), parse_constant=strict)
    rows = pd.DataFrame(found["predictions"])
    assert set(rows["n_per_class"]) == {2, 4} and set(rows["tuning"]) == {"frozen 0", "probe (all)"}
    assert rows[["gain", "gain_lo80"]].notna().all().all() and (rows["gain_lo80"] < rows["gain_hi80"]).all()
    report = (out / "advice.md").read_text()
    assert "## Predictions" in report and "leave one base dataset out" in report and "80% coverage" in report
    assert main(argv[:-3] + ["--sizes", "999", "--no-progress"]) == 2  # more than the folder holds per class
    assert "--sizes:" in capsys.readouterr().err


def test_the_committed_predictor_is_what_fitting_the_committed_dial_gives():
    """results/baselines/domain_gap/predictor.json is computed, not edited: refitting from the baseline's CSVs gives
    the same models, residuals and validation (to 9 significant digits)."""
    from pathlib import Path

    from transferbench.advise import PREDICTOR_FILE, fit_from

    folder = Path("results/baselines/domain_gap")

    def rounded(v):
        if isinstance(v, dict):
            return {k: rounded(x) for k, x in v.items()}
        if isinstance(v, list):
            return [rounded(x) for x in v]
        return float(f"{v:.9g}") if isinstance(v, float) else v

    committed = json.loads((folder / PREDICTOR_FILE).read_text())
    refit = json.loads(json.dumps(fit_from([folder]).to_json()))
    assert rounded(refit) == rounded(committed)
