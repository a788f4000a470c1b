"""Arms against each other (arms.py) on synthetic runs whose true differences are known."""

import numpy as np
import pandas as pd
import pytest

from transferbench.analysis import arms
from transferbench.analysis.gains import t_interval

ARMS = {"frozen 0": (0, 1.0), "groups 0": (0, 0.01), "groups 7": (7, 0.3), "LP-FT": (0, 1.0)}


def synthetic_runs(effects: dict, seeds=range(5), noise=0.01, seed=0) -> pd.DataFrame:
    """effects: {(target, tuning): true test accuracy}; each seed adds a shared seed effect and a little noise."""
    g = np.random.default_rng(seed)
    seed_effect = {s: g.normal(0, 0.05) for s in seeds}
    rows = []
    for (target, tuning), acc in effects.items():
        dataset, _, shift = target.partition("+")
        for s in seeds:
            for lr, penalty in ((1e-3, 0.0), (3e-3, 0.05)):  # the second LR is worse on val: never chosen
                value = acc + seed_effect[s] + g.normal(0, noise) - penalty
                rows.append(dict(status="ok", arm="transfer", tuning=tuning, frozen_depth="0",
                                 frozen_groups=ARMS[tuning][0], frozen_fraction=1 - ARMS[tuning][1],
                                 trained_fraction=ARMS[tuning][1], n_groups=8, backbone="bb", weights="imagenet",
                                 target=target, dataset=dataset, shift=shift.split("@")[0] or None,
                                 n_per_class=32, schedule="cosine", lr=lr, seed=s, test_acc=value, val_acc=value,
                                 converged=True))
    return pd.DataFrame(rows)


TARGETS = ["textures", "textures+gaussian_noise@3", "textures+contrast@3", "glyphs"]


def effects(first_gain: float) -> dict:
    out = {}
    for tg in TARGETS:
        corrupted = "@" in tg
        out |= {(tg, "frozen 0"): 0.6, (tg, "groups 0"): 0.6 + (first_gain if corrupted else -0.1),
                (tg, "groups 7"): 0.55 if corrupted else 0.65, (tg, "LP-FT"): 0.6}
    return out


def test_differences_are_paired_by_seed_and_recover_the_true_effect():
    d = arms.differences(synthetic_runs(effects(0.05)), fdr=0.05, min_effect=0.01).set_index(["target", "tuning"])
    assert d.loc[("textures+gaussian_noise@3", "groups 0"), "diff"] == pytest.approx(0.05, abs=0.02)
    # the seed effect is shared by both arms, so pairing removes it: the interval is as narrow as the noise
    assert d.loc[("textures+gaussian_noise@3", "groups 0"), "verdict"] == "better"
    assert d.loc[("glyphs", "groups 0"), "verdict"] == "worse"
    assert d.loc[("glyphs", "LP-FT"), "verdict"] == "inconclusive"
    assert set(d.reset_index()["tuning"]) == {"groups 0", "groups 7", "LP-FT"}  # never the reference itself


def test_a_pooled_claim_is_a_t_interval_over_seeds_of_the_seed_means():
    runs = synthetic_runs(effects(0.05))
    seeds = arms.contrast(runs, "groups 0", "frozen 0")
    targets = ["textures+gaussian_noise@3", "textures+contrast@3"]
    got = arms.pooled(seeds, "groups 0", targets)
    per_seed = seeds[seeds["target"].isin(targets)].groupby("seed")["diff"].mean().to_numpy()
    lo, hi, p = t_interval(per_seed, 0.95)
    assert (got["ci_low"], got["ci_high"], got["p"]) == pytest.approx((lo, hi, p))
    assert got["n_conditions"] == 2 and got["n_seeds"] == 5


@pytest.mark.parametrize("first_gain, expected", [(0.05, "reproduces"), (-0.05, "reverses"),
                                                  (0.0, "not shown (the interval includes 0)")])
def test_claim_verdicts_follow_the_interval(first_gain, expected):
    claims = arms.claims(synthetic_runs(effects(first_gain), noise=0.001 if first_gain else 0.01)).set_index(
        "contrast")
    assert claims.loc["groups 0 - frozen 0", "verdict"] == expected
    assert claims.loc["groups 0 - frozen 0", "conditions"] == "textures+contrast@3, textures+gaussian_noise@3"
    # without input corruption (clean textures), the last group beats full fine-tuning in these data
    assert claims.loc["groups 7 - frozen 0", "verdict"] == "reproduces"
    assert claims.loc["groups 7 - frozen 0", "conditions"] == "textures"


def test_conditions_are_sorted_by_the_kind_of_shift():
    kinds = arms.condition_kinds(synthetic_runs(effects(0.0)))
    assert kinds == dict(input=["textures+contrast@3", "textures+gaussian_noise@3"], clean=["textures"],
                         far=["glyphs"])


def test_shift_depth_finds_the_group_a_corruption_disturbs():
    ref = np.array([0.2, 0.2, 0.2, 0.2, 0.3, 0.4, 1.1, 0.9])
    noisy = ref * np.array([1.2, 3.0, 1.5, 1.1, 1.0, 1.0, 1.1, 1.0])
    clean = ref * np.array([1.0, 1.0, 1.0, 1.0, 1.1, 1.4, 1.2, 1.3])
    domains = pd.DataFrame([{"backbone": "bb", "weights": "imagenet", "target": tg,
                             **{f"bn_kl_group{i}": v for i, v in enumerate(p)},
                             **{f"bn_kl_ref_group{i}": v for i, v in enumerate(ref)}}
                            for tg, p in (("noisy", noisy), ("clean", clean))])
    depth = arms.shift_depth(domains).set_index("target")
    assert depth.loc["noisy", "peak_group"] == 1 and depth.loc["noisy", "early_share"] > 0.9
    assert depth.loc["clean", "peak_group"] == 5 and depth.loc["clean", "early_share"] == 0


def test_best_arm_is_chosen_on_validation_not_test():
    acc = pd.DataFrame([dict(backbone="bb", weights="w", target="t", n_per_class=8, tuning=name, test=test, val=val,
                             ci_low=test - 0.1, ci_high=test + 0.1)
                        for name, test, val in (("a", 0.9, 0.5), ("b", 0.6, 0.7))])
    best = arms.best_arms(acc).iloc[0]
    assert best["best"] == "b" and best["runner_up"] == "a" and best["test"] == 0.6


def test_permutation_p_is_small_for_a_perfect_order_and_large_for_its_reverse():
    x = np.arange(8.0)
    assert arms.permutation_p(x, x) < 0.001
    assert arms.permutation_p(x, -x) > 0.99
