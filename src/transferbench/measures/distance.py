"""How far a target lies from the source, measured on frozen features.

Shapes: `a` is [n, d] (target features), `b` is [m, d] (source reference features).
"""

from __future__ import annotations

import numpy as np
from scipy import linalg

from transferbench.measures.degenerate import require


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to a and b (Heusel et al. 2017, "FID"):
    |mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2))."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    require(min(len(a), len(b)) >= 2, "a covariance needs 2 samples a side")
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s_a @ s_b)
    if not np.isfinite(covmean).all():  # near-singular product: regularise, as the FID code does
        eps = 1e-6 * np.eye(len(s_a))
        covmean = linalg.sqrtm((s_a + eps) @ (s_b + eps))
    fd = ((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * np.trace(covmean.real)
    return float(max(fd, 0.0))


def mmd2_unbiased(a: np.ndarray, b: np.ndarray, bandwidth: float | None = None) -> float:
    """Unbiased squared MMD with a Gaussian kernel (Gretton et al. 2012, eq. 3); bandwidth by the
    median heuristic on the pooled sample unless given. Near 0 (can dip below) for one distribution."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    require(min(len(a), len(b)) >= 2, "the unbiased MMD needs 2 samples a side")
    pooled = np.concatenate([a, b])
    sq = (pooled ** 2).sum(1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2 * pooled @ pooled.T, 0)
    if bandwidth is None:
        bandwidth = np.sqrt(0.5 * np.median(d2[np.triu_indices_from(d2, k=1)])) or 1.0
    k = np.exp(-d2 / (2 * bandwidth ** 2))
    n, m = len(a), len(b)
    kaa, kbb, kab = k[:n, :n], k[n:, n:], k[:n, n:]
    return float((kaa.sum() - np.trace(kaa)) / (n * (n - 1)) + (kbb.sum() - np.trace(kbb)) / (m * (m - 1))
                 - 2 * kab.mean())


def proxy_a_distance(a: np.ndarray, b: np.ndarray, seed: int = 0) -> float:
    """Proxy A-distance (Ben-David et al. 2007): 2 (1 - 2 err) of a linear domain classifier,
    err by 5-fold cross-validation on a class-balanced sample. 0 = indistinguishable, 2 = separable."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(seed)
    n = min(len(a), len(b))
    require(n >= 5, "5-fold cross-validation needs 5 samples a side")
    x = np.concatenate([a[rng.permutation(len(a))[:n]], b[rng.permutation(len(b))[:n]]])
    y = np.r_[np.zeros(n), np.ones(n)]
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000))
    err = 1 - cross_val_score(clf, x, y, cv=5).mean()
    return float(2 * (1 - 2 * min(err, 0.5)))


def gaussian_kl(mu_p: np.ndarray, var_p: np.ndarray, mu_q: np.ndarray, var_q: np.ndarray, eps: float = 1e-5) -> float:
    """Mean over channels of KL(N(mu_p, var_p) || N(mu_q, var_q)) for per-channel Gaussians [c].
    Used with the target's activation statistics as p and a BatchNorm layer's running statistics as q."""
    var_p, var_q = np.asarray(var_p) + eps, np.asarray(var_q) + eps
    kl = 0.5 * (np.log(var_q / var_p) + (var_p + (np.asarray(mu_p) - mu_q) ** 2) / var_q - 1)
    return float(np.mean(kl))


def _psd_sqrt(m: np.ndarray) -> np.ndarray:
    """The square root of a symmetric positive semi-definite matrix by its eigendecomposition (eigenvalues rounded
    below zero are clipped): exact where scipy's sqrtm warns on singular input, as a constant class's covariance is."""
    values, vectors = np.linalg.eigh((m + m.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def bures_wasserstein2(mu_a: np.ndarray, cov_a: np.ndarray, mu_b: np.ndarray, cov_b: np.ndarray) -> float:
    """Squared 2-Wasserstein distance between two Gaussians (Bures metric on covariances):
    |mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_b^(1/2) S_a S_b^(1/2))^(1/2))."""
    root_b = _psd_sqrt(cov_b)
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(root_b @ cov_a @ root_b), 0, None)).sum()  # the trace of its root
    return float(max(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * cross, 0.0))


def class_gaussians(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
    """Each class's share of the samples and its Gaussian (mean, Ledoit-Wolf shrunk covariance: a k-shot class has
    fewer samples than dimensions, and the plain covariance would be singular)."""
    from sklearn.covariance import ledoit_wolf

    classes, counts = np.unique(y, return_counts=True)
    require(counts.min() >= 2, "a class covariance needs 2 samples per class")
    gaussians = []
    with np.errstate(all="ignore"):  # features so large their squares overflow: refused below, not warned about
        for c in classes:
            try:
                cov = ledoit_wolf(x[y == c])[0]
            except ValueError:  # sklearn's own check of its intermediate (an overflow became NaN)
                cov = np.full((x.shape[1], x.shape[1]), np.nan)
            require(bool(np.isfinite(cov).all()), "a class covariance is not finite (features too large)")
            gaussians.append((x[y == c].mean(0), cov))
    return counts / counts.sum(), gaussians


def otdd_gaussian(a: np.ndarray, ya: np.ndarray, b: np.ndarray, yb: np.ndarray) -> float:
    """Label-aware dataset distance: optimal transport between the two datasets' classes, each class collapsed to a
    Gaussian, at the Bures-Wasserstein cost between class Gaussians (the Gaussian approximation of OTDD, Alvarez-Melis
    & Fusi 2020, section 5, taken to the class level; the mixture distance MW2 of Delon & Desolneux 2020). Returns the
    distance (square root of the transport cost). Unchanged by renaming classes; 0 for one dataset against itself."""
    from scipy.optimize import linprog

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    require(a.ndim == 2 and b.ndim == 2 and len(a) > 0 and len(b) > 0, "a side has no [n, d] features")
    require(bool(np.isfinite(a).all() and np.isfinite(b).all()), "a feature is not finite")
    wa, ga = class_gaussians(a, np.asarray(ya))
    wb, gb = class_gaussians(b, np.asarray(yb))
    cost = np.array([[bures_wasserstein2(ma, sa, mb, sb) for mb, sb in gb] for ma, sa in ga])
    require(bool(np.isfinite(cost).all()), "a class-to-class cost is not finite")
    n, m = cost.shape
    rows = np.kron(np.eye(n), np.ones(m))  # each target class sends its share
    cols = np.kron(np.ones(n), np.eye(m))  # each source class receives its share
    plan = linprog(cost.ravel(), A_eq=np.vstack([rows, cols]), b_eq=np.r_[wa, wb], bounds=(0, None), method="highs")
    require(plan.status == 0, f"the transport problem failed: {plan.message}")
    return float(np.sqrt(max(plan.fun, 0.0)))
