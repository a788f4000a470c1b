"""Coverage of the delete-one-dataset jackknife t-interval for Kendall's tau (the measure ranking, correlations.csv
`resampled: datasets`), simulated on clustered dials like domain_gap's.

    .venv/bin/python bench/tau_coverage.py [REPS]

Each dial: k base datasets x m conditions. A measure x and a gain y share a per-dataset shift (x and y move together
within a dataset: dial levels are not independent) and carry independent noise; y = slope * x + noise. The true tau
is the population Kendall tau of (x, y) pairs drawn from the same process with a fresh dataset per pair member
(computed on 200,000 draws). The interval is analysis.predictors' own: tau on all conditions -/+ t(k-1) x the
jackknife SE from the k taus without one dataset, clipped to [-1, 1].
"""

import sys

import numpy as np
from scipy import stats

from transferbench.analysis.gains import jackknife, kendall_tau_b


def draw(rng, k, m, slope, shared):
    d = np.repeat(np.arange(k), m)
    shift = rng.normal(0, shared, k)[d]
    x = rng.normal(0, 1, k * m) + shift
    y = slope * x + rng.normal(0, 1, k * m) + shift
    return d, x, y


def true_tau(slope, shared, n=200_000, seed=123):
    rng = np.random.default_rng(seed)
    _, x, y = draw(rng, n, 1, slope, shared)  # one condition per dataset: independent pairs from the marginal
    return stats.kendalltau(x[:20_000], y[:20_000]).statistic


def coverage(k, m, slope, shared, reps, confidence=0.9, seed=0):
    rng = np.random.default_rng(seed)
    truth = true_tau(slope, shared)
    hits, widths = 0, []
    for _ in range(reps):
        d, x, y = draw(rng, k, m, slope, shared)
        tau = kendall_tau_b(x, y)
        without = np.array([kendall_tau_b(x[d != g], y[d != g]) for g in range(k)])
        lo, hi = (float(np.clip(v, -1, 1)) for v in jackknife(without, tau, confidence))
        hits += lo <= truth <= hi
        widths.append(hi - lo)
    return truth, hits / reps, float(np.median(widths)) / 2


if __name__ == "__main__":
    reps = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    print("| datasets x conditions | slope | shared shift sd | true tau | nominal | covered | median half-width |")
    print("|---|---|---|---|---|---|---|")
    for k, m in ((6, 4), (8, 3), (12, 2)):
        for slope in (0.0, 0.5):
            for shared in (0.0, 0.5):
                truth, cov, half = coverage(k, m, slope, shared, reps)
                print(f"| {k} x {m} | {slope} | {shared} | {truth:+.2f} | 90% | {cov:.1%} | {half:.2f} |")
