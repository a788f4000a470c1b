"""The domain dial (analysis/dial.py): break-even distances on synthetic dials whose truth is known."""

import numpy as np
import pandas as pd
import pytest

from transferbench.analysis.dial import break_even, dial


def synthetic(rng, datasets=8, per=4, true=3.0, dataset_sd=0.03, noise=0.03, slope=-0.1):
    """Conditions of `datasets` base datasets at random distances in [0, 6]: gain = slope x (d - true), plus a shift
    shared by a dataset's conditions (they are not independent) and noise per condition."""
    d, y, names = [], [], []
    for i in range(datasets):
        shared = rng.normal(0, dataset_sd)
        for x in rng.uniform(0, 6, per):
            d.append(x), y.append(slope * (x - true) + shared + rng.normal(0, noise)), names.append(f"ds{i}")
    return np.array(d), np.array(y), np.array(names)


def test_the_break_even_of_a_clean_line_is_where_it_crosses_zero():
    d = np.array([0.0, 1, 2, 4, 5, 6])
    r = break_even(d, 0.3 - 0.1 * d + np.array([0.01, -0.01, 0.0, 0.01, -0.01, 0.0]), np.array(list("aabbcc")))
    assert r["break_even"] == pytest.approx(3.0, abs=0.1) and r["reached"]
    assert r["be_low"] < 3.0 < r["be_high"] and r["slope_high"] < 0
    assert 0 < r["pays_until"] <= r["break_even"]  # the band's lower end reaches zero first


def test_a_gain_that_barely_falls_does_not_break_even_within_the_dial():
    d = np.array([0.0, 1, 2, 4, 5, 6])
    r = break_even(d, 0.5 - 0.01 * d + np.array([0.01, -0.01, 0.0, 0.01, -0.01, 0.0]), np.array(list("aabbcc")))
    assert not r["reached"] and r["break_even"] > r["d_max"] and np.isnan(r["pays_until"])  # pays across the dial


def test_a_gain_that_rises_with_distance_has_no_break_even():
    d = np.array([0.0, 1, 2, 4, 5, 6])
    r = break_even(d, 0.1 + 0.01 * d, np.array(list("aabbcc")))
    assert r["break_even"] == np.inf and not r["reached"] and np.isnan(r["be_low"])


@pytest.mark.parametrize("datasets,dataset_sd", [(6, 0.03), (8, 0.0), (12, 0.06)])
def test_the_break_even_interval_has_its_coverage(datasets, dataset_sd):
    """400 simulated dials with conditions clustered by dataset: the 90% interval covers the true break-even in
    90% +- 4.5% of them."""
    rng = np.random.default_rng(datasets)
    covered = 0
    for _ in range(400):
        r = break_even(*synthetic(rng, datasets=datasets, dataset_sd=dataset_sd), confidence=0.9)
        covered += r["be_low"] <= 3.0 <= r["be_high"]
    assert abs(covered / 400 - 0.9) <= 0.045, covered / 400


def test_dial_fits_each_group_and_outcome_and_skips_too_few_datasets():
    rng = np.random.default_rng(0)
    d, y, names = synthetic(rng, datasets=6)
    targets = [f"t{i}" for i in range(len(d))]
    gains = pd.DataFrame(dict(backbone="m", weights="imagenet", tuning="frozen 0", n_per_class=8, target=targets,
                              gain=y, rer=y / 2))
    domains = pd.DataFrame(dict(backbone="m", weights="imagenet", target=targets, dataset=names, fd=d * 10))
    rows, bands = dial(gains, domains, ["fd", "mmd"])
    assert set(rows["outcome"]) == {"gain", "rer"} and set(rows["distance"]) == {"fd"}
    gain = rows.set_index("outcome").loc["gain"]
    assert gain["break_even"] == pytest.approx(30, rel=0.15) and gain["n_datasets"] == 6
    assert len(bands) == 2 * 41 and (bands["low"] <= bands["fit"]).all()
    few = domains.assign(dataset=np.where(np.arange(len(d)) % 2, "a", "b"))  # two base datasets
    assert dial(gains, few, ["fd"])[0].empty
