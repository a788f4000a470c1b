import numpy as np
import pandas as pd
import pytest

from transferbench.analysis.gains import bh_q, gains, t_interval


def runs(transfer_acc, scratch_acc, target="t", depth="0", schedule="cosine", val_shift=0.0, lr=1e-3,
         scratch_val_shift=0.0, scratch_schedule=None):
    rows = []
    for seed, (a, b) in enumerate(zip(transfer_acc, scratch_acc)):
        common = dict(backbone="m", target=target, n_per_class=5, seed=seed, status="ok", lr=lr)
        rows.append(common | dict(arm="transfer", weights="imagenet", frozen_depth=depth, frozen_groups=0,
                                  frozen_fraction=0.0, test_acc=a, val_acc=a + val_shift, schedule=schedule))
        rows.append(common | dict(arm="scratch", weights="none", frozen_depth=0, frozen_groups=0,
                                  frozen_fraction=0.0, test_acc=b, val_acc=b + scratch_val_shift,
                                  schedule=scratch_schedule or schedule))
    return pd.DataFrame(rows)


def test_paired_gain_and_verdicts():
    pos = gains(runs([0.8, 0.7, 0.75], [0.5, 0.45, 0.5]))
    assert pos.loc[0, "gain"] == pytest.approx(0.2667, abs=1e-3) and pos.loc[0, "verdict"] == "positive"
    assert pos.loc[0, "ci_low"] <= pos.loc[0, "gain"] <= pos.loc[0, "ci_high"]
    neg = gains(runs([0.3, 0.35, 0.3], [0.5, 0.45, 0.5]))
    assert neg.loc[0, "verdict"] == "negative" and neg.loc[0, "ci_high"] < 0
    mixed = gains(runs([0.6, 0.4, 0.5], [0.5, 0.5, 0.5]))
    assert mixed.loc[0, "verdict"] == "inconclusive"


def test_single_seed_is_never_a_verdict():
    g = gains(runs([0.9], [0.1]))
    assert g.loc[0, "n_seeds"] == 1 and g.loc[0, "verdict"] == "inconclusive"


def coverage(n: int, draw, confidence=0.95, reps=4000, seed=0) -> float:
    """Share of t-intervals over n draws that hold the true mean (0): the interval's real coverage."""
    x = draw(np.random.default_rng(seed), (reps, n))
    hits = [lo <= 0 <= hi for lo, hi, _ in (t_interval(row, confidence) for row in x)]
    return float(np.mean(hits))


NORMAL = lambda rng, shape: rng.normal(0, 1, shape)  # noqa: E731
SKEWED = lambda rng, shape: rng.exponential(1, shape) - 1  # noqa: E731  (mean 0, skew 2)


def test_t_interval_has_its_nominal_coverage():
    """Measured here (4,000 draws): normal n=3 0.953, n=5 0.949; exponential (skew 2) n=3 0.875, n=5 0.878. The
    percentile
    bootstrap it replaces covered 0.75 at n=3 (it is the seed range)."""
    assert coverage(5, NORMAL) >= 0.93
    assert coverage(3, NORMAL) >= 0.93
    assert coverage(5, SKEWED) >= 0.86  # skewed differences: stated, not hidden
    x = np.random.default_rng(1).normal(0, 1, (4000, 3))
    seed_range = np.mean((x.min(1) <= 0) & (0 <= x.max(1)))
    assert 0.72 <= seed_range <= 0.78


def test_t_interval_of_known_samples():
    lo, hi, p = t_interval(np.array([1.0, 2.0, 3.0]), 0.95)
    assert (lo, hi) == pytest.approx((2 - 4.303 * 1 / np.sqrt(3), 2 + 4.303 / np.sqrt(3)), abs=1e-3)
    from scipy.stats import ttest_1samp

    assert p == pytest.approx(ttest_1samp([1.0, 2.0, 3.0], 0).pvalue)  # 0.0742
    assert t_interval(np.array([0.2, 0.2]), 0.95) == (0.2, 0.2, 0.0)
    assert all(np.isnan(t_interval(np.array([0.3]), 0.95)))


def test_benjamini_hochberg_and_the_verdict_rule():
    q = bh_q(pd.Series([0.01, 0.04, 0.03, np.nan, 0.5]))
    assert q.tolist()[:3] == pytest.approx([0.04, 0.16 / 3, 0.16 / 3]) and np.isnan(q[3]) and q[4] == 0.5
    tiny = gains(runs([0.505, 0.506, 0.507], [0.5, 0.5, 0.5]))  # certain, but below the 1 pp minimum effect
    assert tiny.loc[0, "p"] < 0.01 and tiny.loc[0, "verdict"] == "inconclusive"


def test_a_true_zero_effect_is_rarely_called_across_many_points():
    """108 null grid points of 3 seeds: BH keeps false verdicts rare (per-point tests at 5% would give ~5)."""
    rng = np.random.default_rng(0)
    frames = [runs(0.5 + rng.normal(0, 0.03, 3), 0.5 + rng.normal(0, 0.03, 3), target=f"t{i}") for i in range(108)]
    g = gains(pd.concat(frames))
    assert (g["p"] < 0.05).sum() >= 2  # the raw tests do fire
    assert (g["verdict"] != "inconclusive").sum() <= 1


def test_failed_cells_and_unmatched_transfer_cells_do_not_count():
    df = runs([0.8, 0.7], [0.5, 0.5])
    df.loc[1, "status"] = "failed"  # scratch seed 0
    g = gains(df)
    assert g.loc[0, "n_seeds"] == 1


def test_each_arm_chooses_its_own_configuration_on_val_and_the_oracle_on_test():
    a = runs([0.6] * 3, [0.5] * 3, schedule="constant", val_shift=0.3)  # transfer: best on val
    b = runs([0.7] * 3, [0.4] * 3, schedule="cosine", scratch_val_shift=0.3)  # transfer: best on test; scratch: on val
    both = pd.concat([a, b])
    g = gains(both)
    assert g.loc[0, "transfer_schedule"] == "constant" and g.loc[0, "scratch_schedule"] == "cosine"
    assert g.loc[0, "gain"] == pytest.approx(0.6 - 0.4)  # each arm at its own choice, not the other's
    oracle = gains(both, on="test_acc")
    assert oracle.loc[0, "transfer_schedule"] == "cosine" and oracle.loc[0, "scratch_schedule"] == "constant"


def test_points_are_flagged_below_the_pixels_or_not_converged():
    df = runs([0.6, 0.62, 0.61], [0.3, 0.32, 0.31])
    df["converged"] = [True, True, True, False, True, True]  # scratch seed 1 did not converge
    pixels = [dict(arm="pixels", backbone="nearest_centroid", weights="none", target="t", n_per_class=5, seed=s,
                   status="ok", test_acc=0.7, val_acc=0.7, frozen_depth=0, schedule="none", lr=0.0, converged=True)
              for s in range(3)]
    g = gains(pd.concat([df, pd.DataFrame(pixels)], ignore_index=True))
    assert g.loc[0, "pixels_best"] == pytest.approx(0.7) and bool(g.loc[0, "below_pixels"])
    assert g.loc[0, "scratch_converged"] == pytest.approx(2 / 3)
    assert "scratch not converged (67%)" in g.loc[0, "flags"]
    assert "transfer and scratch below pixels (70.0%)" in g.loc[0, "flags"]


def test_kendall_tau_b_matches_scipy_with_ties():
    from scipy.stats import kendalltau

    from transferbench.analysis.gains import kendall_tau_b

    r = np.random.default_rng(0)
    for _ in range(20):
        x, y = r.integers(0, 5, 12).astype(float), r.integers(0, 5, 12).astype(float)
        assert kendall_tau_b(x, y) == pytest.approx(kendalltau(x, y).statistic)
    assert kendall_tau_b(np.arange(10.0), np.arange(10.0) ** 2) == 1.0


def test_estimators_are_judged_with_targets_as_units():
    from transferbench.analysis.predictors import correlations, measure_ranking, top_two

    targets = [f"t{i}" for i in range(6)]
    gain = np.array([0.30, 0.25, 0.20, 0.12, 0.05, 0.01])
    selected = pd.DataFrame([dict(backbone=b, weights="imagenet", target=t, n_per_class=n, frozen_depth="all",
                                  gain=g + 0.01 * (b == "m2"), transfer_mean=0.5 + g)
                             for b in ("m1", "m2") for t, g in zip(targets, gain) for n in (1, 8)])
    rng = np.random.default_rng(0)
    domains = pd.DataFrame([dict(backbone=b, weights="imagenet", target=t, fd=10 - 30 * g + rng.normal(0, 0.1),
                                 knn_acc=rng.uniform()) for b in ("m1", "m2") for t, g in zip(targets, gain)])
    corr = correlations(domains, selected, n_boot=500)
    fd = corr[(corr["measure"] == "fd") & (corr["outcome"] == "gain")]
    assert (fd["n_targets"] == 6).all() and (fd["tau"] == -1).all()  # 6 targets, not 12 (backbone, target) points
    assert (fd["loo_min"] == -1).all() and (fd["ci_low"] <= -0.6).all()
    ranking = measure_ranking(corr)
    assert ranking["measure"].iloc[0] == "fd"
    verdict = top_two(domains, selected, ranking, n_boot=500)
    assert verdict["first"] == "fd" and verdict["second"] == "knn_acc" and verdict["ci_low"] <= verdict["difference"]


def dial_tables(rng, gain_of):
    """12 conditions of 6 base datasets (two each; 2 to 20 classes by dataset), one backbone, at 8 per class;
    `gain_of(classes, i)` gives each condition's gain. fd tracks nothing; knn_acc is noise."""
    rows, doms, classes = [], [], {}
    for i in range(12):
        t, c = f"t{i}", [2, 4, 6, 8, 10, 20][i // 2]
        classes[t] = c
        rows.append(dict(backbone="m", weights="imagenet", target=t, n_per_class=8, frozen_depth=0,
                         gain=gain_of(c, i), transfer_mean=0.5))
        doms.append(dict(backbone="m", weights="imagenet", target=t, dataset=f"d{i // 2}", fd=rng.uniform(0, 10),
                         knn_acc=rng.uniform()))
    return pd.DataFrame(doms), pd.DataFrame(rows), pd.Series(classes)


def test_the_trivial_predictor_is_the_bar_a_measure_must_clear():
    """Where the gain follows the number of classes alone, the trivial predictor (fitted without each condition's
    base dataset) ranks the conditions, intervals resample base datasets, and no measure beats it."""
    from transferbench.analysis.predictors import correlations, measure_ranking, top_two

    rng = np.random.default_rng(0)
    domains, selected, classes = dial_tables(rng, lambda c, i: 0.05 * np.log(c))
    corr = correlations(domains, selected, n_boot=200, classes=classes)
    trivial = corr[(corr["measure"] == "trivial") & (corr["outcome"] == "gain")].iloc[0]
    assert trivial["tau"] == 1 and trivial["resampled"] == "datasets" and trivial["n_datasets"] == 6
    duel = top_two(domains, selected, measure_ranking(corr), n_boot=200, classes=classes)
    assert duel["first"] != "trivial" and duel["beats_trivial"] is False and duel["vs_trivial"] < 0


def test_a_measure_that_tracks_the_gain_beats_the_trivial_predictor():
    from transferbench.analysis.predictors import correlations, measure_ranking, top_two

    rng = np.random.default_rng(1)
    domains, selected, classes = dial_tables(rng, lambda c, i: 0.3 - 0.02 * i)
    domains["fd"] = np.arange(12) + rng.normal(0, 0.1, 12)  # the distance grows as the gain falls
    corr = correlations(domains, selected, n_boot=200, classes=classes)
    duel = top_two(domains, selected, measure_ranking(corr), n_boot=200, classes=classes)
    assert duel["first"] == "fd" and duel["beats_trivial"] is True and duel["trivial_low"] > 0


def test_a_verdict_that_rests_on_a_q_near_the_level_says_so():
    """A q within a factor of two of the level, either side, with a gain large enough to count, is near it: the
    Headline gives its q and the Summary's count says how many verdicts (and inconclusive points) are."""
    from types import SimpleNamespace

    from transferbench.analysis.gains import near_the_level
    from transferbench.core.study import load_study, study_path
    from transferbench.report.dial import baseline_sentence
    from transferbench.report.document import gain_text

    assert near_the_level(0.1, 0.03, 0.05, 0.01) and near_the_level(-0.1, 0.09, 0.05, 0.01)
    assert not near_the_level(0.1, 0.02, 0.05, 0.01) and not near_the_level(0.1, 0.11, 0.05, 0.01)
    assert not near_the_level(0.005, 0.04, 0.05, 0.01)  # too small to count whatever its q
    study = load_study(study_path("smoke"))
    selected = pd.DataFrame(dict(gain_vs_baseline=[0.2, 0.2, -0.1, 0.1, 0.1],
                                 gvb_q=[0.001, 0.04, 0.03, 0.08, 0.3],
                                 gvb_verdict=["positive", "positive", "negative", "inconclusive", "inconclusive"]))
    said = baseline_sentence(study, SimpleNamespace(selected=selected))
    assert "reliably better at 2 and reliably worse at 1 of 5 grid points" in said
    assert "; 2 of these verdicts and 1 inconclusive point have q within a factor of two of 0.05" in said
    assert "within a factor" not in baseline_sentence(study, SimpleNamespace(selected=selected.iloc[[0, 4]]))
    row = SimpleNamespace(gain=0.2, ci_low=0.1, ci_high=0.3, q=0.04, verdict="positive", flags="")
    assert gain_text(row, 0.05, 0.01) == "+20.0 pp [+10.0, +30.0] (positive; q 0.04, near the level)"
    row.q = 0.001
    assert gain_text(row, 0.05, 0.01) == "+20.0 pp [+10.0, +30.0] (positive)"
