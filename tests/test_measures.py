import numpy as np
import pytest
from scipy.stats import special_ortho_group

from transferbench.measures import (
    frechet_distance,
    gaussian_kl,
    h_score,
    knn_accuracy,
    leep,
    logme,
    mmd2_unbiased,
    nce,
    otdd_gaussian,
    proxy_a_distance,
)

rng = np.random.default_rng(0)
A = rng.normal(size=(300, 8))
B = rng.normal(size=(300, 8))


def test_frechet_distance_known_answers():
    assert frechet_distance(A, A) == pytest.approx(0, abs=1e-6)
    shift = np.array([3.0] + [0] * 7)
    assert frechet_distance(A, A + shift) == pytest.approx(9.0, rel=1e-6)  # same covariance: |t|^2


def test_mmd_is_near_zero_for_one_distribution_and_large_otherwise():
    assert abs(mmd2_unbiased(A, B)) < 0.01
    assert mmd2_unbiased(A, B + 3) > 0.5


def test_proxy_a_distance_bounds():
    assert proxy_a_distance(A, A) < 0.3  # identical sets: the classifier is at chance
    assert proxy_a_distance(A, B + 10) > 1.9  # separable sets: PAD near 2


def test_gaussian_kl_by_hand():
    assert gaussian_kl(np.zeros(3), np.ones(3), np.zeros(3), np.ones(3), eps=0) == 0
    assert gaussian_kl(np.zeros(1), np.ones(1), np.ones(1), np.ones(1), eps=0) == pytest.approx(0.5)
    assert gaussian_kl(np.zeros(1), np.ones(1), np.zeros(1), 4 * np.ones(1), eps=0) == pytest.approx(
        0.5 * (np.log(4) + 0.25 - 1))


def test_leep_small_example_worked_by_hand():
    probs = np.array([[0.8, 0.2], [0.3, 0.7]])
    assert leep(probs, np.array([0, 1])) == pytest.approx(np.log(0.62626), abs=1e-4)


def test_leep_of_a_perfect_source_head_is_zero_and_of_a_useless_one_is_log_prior():
    y = np.repeat(np.arange(4), 10)
    assert leep(np.eye(4)[y], y) == pytest.approx(0, abs=1e-9)
    assert leep(np.full((40, 6), 1 / 6), y) == pytest.approx(np.log(1 / 4))


def test_nce_deterministic_and_independent():
    y = np.repeat(np.arange(4), 10)
    assert nce((y + 1) % 4, y) == pytest.approx(0, abs=1e-12)  # a relabelling: z determines y
    z = np.tile(np.arange(5), 8)  # independent of y, balanced
    assert nce(z, y) == pytest.approx(-np.log(4))


def test_h_score_one_dimensional_example():
    assert h_score(np.array([[-1.0], [-1.0], [1.0], [1.0]]), np.array([0, 0, 1, 1])) == pytest.approx(1.0)


def test_logme_and_h_score_are_invariant_to_rotation_and_order():
    y = np.repeat(np.arange(3), 40)
    f = rng.normal(size=(120, 6)) + np.eye(6)[y] * 2
    rot = special_ortho_group.rvs(6, random_state=1)
    perm = rng.permutation(120)
    assert logme(f @ rot, y) == pytest.approx(logme(f, y), rel=1e-6)
    assert logme(f[perm], y[perm]) == pytest.approx(logme(f, y), rel=1e-9)
    assert h_score(f @ rot + 5, y) == pytest.approx(h_score(f, y), rel=1e-6)


def test_estimators_prefer_informative_features():
    y = np.repeat(np.arange(3), 40)
    good = rng.normal(size=(120, 6)) + np.eye(6)[y] * 3
    bad = rng.normal(size=(120, 6))
    assert logme(good, y) > logme(bad, y)
    assert h_score(good, y) > h_score(bad, y)
    assert knn_accuracy(good, y) > 0.9 > knn_accuracy(bad, y)


def test_h_score_shrinkage_form_stays_within_its_bound():
    """Ibrahim et al. 2022's form: the (1 - a) factor on the between-class covariance. Without it, pure noise in
    512 dimensions scored 69.2 and one example per class exceeded the C - 1 bound."""
    noise, y = rng.normal(size=(50, 512)), rng.integers(0, 5, 50)
    assert 0 <= h_score(noise, y) < 4
    one_shot = rng.normal(size=(10, 64))
    assert h_score(one_shot, np.arange(10)) <= 9


@pytest.mark.parametrize("fn,args,reason", [
    (h_score, (np.ones((10, 3)), np.arange(10) % 2), "constant features"),
    (knn_accuracy, (rng.normal(size=(10, 4)), np.arange(10)), "a class has one example"),
    (mmd2_unbiased, (A[:1], B), "2 samples a side"),
    (frechet_distance, (A[:1], B), "2 samples a side"),
    (proxy_a_distance, (A[:4], B), "5 samples a side"),
    (logme, (A[:1], np.zeros(1, int)), "fewer than 2 examples"),
    (otdd_gaussian, (A[:3], np.arange(3) % 2, B, np.zeros(300, int)), "2 samples per class"),
    (otdd_gaussian, (np.where(A > 2, np.nan, A), np.arange(300) % 2, B, np.zeros(300, int)), "not finite"),
    (otdd_gaussian, (A[:0], np.zeros(0, int), B, np.zeros(300, int)), "no [n, d] features"),
    (otdd_gaussian, (A * 1e300, np.arange(300) % 2, B, np.zeros(300, int)), "not finite"),
])
def test_degenerate_inputs_give_nan_with_a_reason(fn, args, reason):
    from transferbench.measures import safely

    value, why = safely(fn, *args)
    assert np.isnan(value) and reason in why


def test_logme_golden_value_with_more_dimensions_than_examples():
    """The thin-SVD LogME equals the full d x d eigendecomposition it replaced (value computed with that code)."""
    r = np.random.default_rng(0)
    y = np.repeat(np.arange(4), 10)
    r.normal(size=(40, 8))  # the draw the golden value was computed after
    f = r.normal(size=(40, 300)) + np.eye(300)[y % 300] * 2
    assert logme(f, y) == pytest.approx(-0.6805433296493075, rel=1e-9)


def test_gbc_is_zero_for_separated_classes_and_falls_as_they_overlap():
    from transferbench.measures import gbc

    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], 20)
    centres = np.eye(3, 8) * 50
    far = centres[y] + rng.normal(size=(60, 8))
    near = centres[y] / 50 + rng.normal(size=(60, 8))
    assert -1e-6 < gbc(far, y) <= 0 and gbc(near, y) < gbc(far, y) - 1
    assert gbc(near @ np.linalg.qr(rng.normal(size=(8, 8)))[0], y) == pytest.approx(gbc(near, y), rel=1e-6)


def test_otdd_known_answers_relabelling_and_class_weights():
    """Zero against itself and under renamed classes; a shift of every class by v moves it |v|; where class shares
    differ, the transport splits a class (a 1-d case worked by hand: all of N(0, S) meets half N(0, S) and half
    N(4, S), cost 0.5 * 0 + 0.5 * 16)."""
    r = np.random.default_rng(1)
    y = np.repeat(np.arange(3), 40)
    x = np.eye(3, 6)[y] * 5 + r.normal(size=(120, 6))
    assert otdd_gaussian(x, y, x, y) == pytest.approx(0, abs=1e-6)
    assert otdd_gaussian(x, y, x, (y + 1) % 3) == pytest.approx(0, abs=1e-6)
    v = np.array([3.0, 0, 4, 0, 0, 0])
    assert otdd_gaussian(x + v, y, x, y) == pytest.approx(5.0, rel=1e-6)
    one = r.normal(size=(50, 1))
    source = np.concatenate([one, one + 4])
    assert otdd_gaussian(one, np.zeros(50, int), source, np.repeat([0, 1], 50)) == pytest.approx(np.sqrt(8), rel=1e-6)


def test_otdd_sees_labels_where_label_free_distances_cannot():
    """Two datasets with the same images but classes split differently: FD sees one distribution, OTDD does not."""
    r = np.random.default_rng(2)
    x = r.normal(size=(400, 4))
    by_sign, by_other = (x[:, 0] > 0).astype(int), (x[:, 1] > 0).astype(int)
    assert frechet_distance(x, x) == pytest.approx(0, abs=1e-6)
    assert otdd_gaussian(x, by_sign, x, by_other) > 0.5 > otdd_gaussian(x, by_sign, x, by_sign)


def test_bures_distance_is_exact_for_singular_covariances():
    """A class whose images are all alike has a zero covariance: the distance is then the mean gap plus the other
    side's trace, exactly, with no warning (scipy's sqrtm warned and could be inaccurate here)."""
    import warnings

    from transferbench.measures.distance import bures_wasserstein2

    r = np.random.default_rng(3)
    x = r.normal(size=(50, 4))
    cov = np.cov(x, rowvar=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        d = bures_wasserstein2(np.zeros(4), np.zeros((4, 4)), np.ones(4), cov)
    assert d == pytest.approx(4 + np.trace(cov), rel=1e-12)
    s1, s2 = np.diag([1.0, 4.0]), np.diag([9.0, 1.0])  # commuting: (sqrt(s1) - sqrt(s2))^2 on the diagonal
    assert bures_wasserstein2(np.zeros(2), s1, np.zeros(2), s2) == pytest.approx((1 - 3) ** 2 + (2 - 1) ** 2)
