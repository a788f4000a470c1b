"""Transferability estimates without fine-tuning.

Shapes: `features` [n, d] (frozen backbone features of the target's training pool), `labels` [n]
ints in 0..C-1, `source_probs` [n, Z] (the backbone's source-head softmax, rows sum to 1).
Higher means "expected to transfer better" for every estimator here.
"""

from __future__ import annotations

import math

import numpy as np

from transferbench.measures.degenerate import require


def logme(features: np.ndarray, labels: np.ndarray, max_iter: int = 11) -> float:
    """LogME (You et al. 2021): log maximum evidence of a Bayesian linear model on the features,
    per one-hot class target, averaged over classes and divided by n."""
    f = np.asarray(features, np.float64)
    n, d = f.shape
    require(n >= 2, "fewer than 2 examples")
    # Thin SVD of F: the r = min(n, d) non-zero eigenvalues of F^T F and their vectors. The d - r zero eigenvalues
    # add nothing to gamma or m and (d - r) log(alpha) to the log-determinant: exact, and cheap when n << d.
    _, sv, vt = np.linalg.svd(f, full_matrices=False)
    v, s, zeros = vt.T, sv ** 2, d - len(sv)
    evidences = []
    for c in np.unique(labels):
        y = (labels == c).astype(np.float64)
        proj = v.T @ (f.T @ y)
        alpha, beta = 1.0, 1.0
        for _ in range(max_iter):  # fixed-point updates of the prior and noise precisions
            gamma = (s / (s + alpha / beta)).sum()
            m = v @ (proj * beta / (alpha + beta * s))
            alpha_de = (m * m).sum()
            beta_de = ((y - f @ m) ** 2).sum()
            new_alpha, new_beta = gamma / (alpha_de + 1e-5), (n - gamma) / (beta_de + 1e-5)
            converged = abs(new_alpha / new_beta - alpha / beta) / (alpha / beta) < 0.01
            alpha, beta = new_alpha, new_beta
            if converged:
                break
        evidence = (d / 2 * np.log(alpha) + n / 2 * np.log(beta)
                    - 0.5 * (np.log(alpha + beta * s).sum() + zeros * np.log(alpha))
                    - beta / 2 * beta_de - alpha / 2 * alpha_de - n / 2 * np.log(2 * np.pi))
        evidences.append(evidence / n)
    return float(np.mean(evidences))


def _joint(source_probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Empirical joint P(y, z) [C, Z] of target label y and source label z."""
    onehot = np.eye(labels.max() + 1)[labels]
    return onehot.T @ np.asarray(source_probs, np.float64) / len(labels)


def leep(source_probs: np.ndarray, labels: np.ndarray) -> float:
    """LEEP (Nguyen et al. 2020): mean log-likelihood of the target labels under the "expected
    empirical predictor" sum_z P(y|z) theta_z(x). At most 0; 0 for a perfect, deterministic source head."""
    joint = _joint(source_probs, labels)
    cond = joint / np.maximum(joint.sum(0, keepdims=True), 1e-12)  # P(y|z)
    eep = np.asarray(source_probs) @ cond.T  # [n, C]
    return float(np.mean(np.log(np.maximum(eep[np.arange(len(labels)), labels], 1e-12))))


def nce(source_labels: np.ndarray, labels: np.ndarray) -> float:
    """NCE (Tran et al. 2019): negative conditional entropy -H(Y | Z) of target labels given the
    source head's hard labels z = argmax. At most 0; 0 when z determines y."""
    z = np.unique(source_labels, return_inverse=True)[1]
    joint = _joint(np.eye(z.max() + 1)[z], labels)
    pz = joint.sum(0, keepdims=True)
    nz = joint > 0
    return float((joint[nz] * np.log((joint / np.maximum(pz, 1e-12))[nz])).sum())


def h_score(features: np.ndarray, labels: np.ndarray) -> float:
    """H-score (Bao et al. 2019) in the shrinkage form of Ibrahim et al. 2022:
    tr(((1 - a) S_f + a (tr(S_f)/d) I)^-1 (1 - a) S_g), a the Ledoit-Wolf shrinkage, S_g the covariance of the class
    means. The (1 - a) on S_g keeps it within its C - 1 bound, and near 0 on noise in high dimension. Invariant to
    rotations and translations of the features, not to general affine maps (the shrinkage target is isotropic)."""
    from sklearn.covariance import LedoitWolf

    f = np.asarray(features, np.float64)
    f = f - f.mean(0)
    require(len(np.unique(labels)) >= 2, "fewer than 2 classes")
    require(float((f ** 2).sum()) > 0, "constant features")
    lw = LedoitWolf(assume_centered=True).fit(f)
    class_means = np.stack([f[labels == c].mean(0) for c in np.unique(labels)])
    g = class_means[np.unique(labels, return_inverse=True)[1]]  # E[f | y] for every sample
    cov_g = (1 - lw.shrinkage_) * (g.T @ g / len(f))
    return float(np.trace(np.linalg.solve(lw.covariance_, cov_g)))


def knn_accuracy(features: np.ndarray, labels: np.ndarray, k: int = 5) -> float:
    """Leave-one-out k-nearest-neighbour accuracy with cosine similarity (k at most n - 1)."""
    require(len(labels) > 0 and np.unique(labels, return_counts=True)[1].min() >= 2,
            "a class has one example: no leave-one-out neighbour can share its label")
    k = min(k, len(labels) - 1)
    f = np.asarray(features, np.float64)
    f = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
    sim = f @ f.T
    np.fill_diagonal(sim, -np.inf)
    nearest = np.argsort(-sim, axis=1)[:, :k]
    votes = np.apply_along_axis(np.bincount, 1, labels[nearest], minlength=labels.max() + 1)
    return float((votes.argmax(1) == labels).mean())


def gbc(features: np.ndarray, labels: np.ndarray, dims: int = 64) -> float:
    """GBC (Pandy et al. 2022): minus the sum over ordered pairs of classes of the Bhattacharyya coefficient between
    per-class Gaussians (diagonal covariance) on the features projected onto their first `dims` principal axes.
    At most 0; 0 when no two classes overlap. Pandy et al. found it the best at ranking which target a source
    helps most."""
    f = np.asarray(features, np.float64)
    classes, counts = np.unique(labels, return_counts=True)
    require(len(classes) >= 2, "fewer than 2 classes")
    require(counts.min() >= 2, "a class has one example: its variance is undefined")
    f = f - f.mean(0)
    _, _, vt = np.linalg.svd(f, full_matrices=False)
    z = f @ vt[:min(dims, len(f) - 1)].T
    require(float((z ** 2).sum()) > 0, "constant features")
    floor = 1e-6 * z.var(0).mean()  # a class constant along an axis has no density there: a small floor
    mu = np.stack([z[labels == c].mean(0) for c in classes])
    var = np.stack([z[labels == c].var(0) for c in classes]) + floor
    total = 0.0
    for i in range(len(classes)):
        for j in range(len(classes)):
            if i != j:
                v = (var[i] + var[j]) / 2
                spread = np.log(v).sum() - 0.5 * (np.log(var[i]).sum() + np.log(var[j]).sum())
                db = ((mu[i] - mu[j]) ** 2 / v).sum() / 8 + 0.5 * spread  # the Bhattacharyya distance
                total += math.exp(-db)
    return -total
