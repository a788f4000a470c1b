"""Closed-form and convex learners: the trivial pixel baselines, and the linear probe fitted to convergence.

A comparison is only as good as its weakest arm, so every k-shot subset also gets a nearest-centroid and a
logistic-regression classifier on its raw pixels. A linear probe on frozen features is a convex problem: it is
solved by L-BFGS (scikit-learn's multinomial logistic regression) with its L2 strength chosen on validation,
and the solution is copied into the network's linear head, so the probe is tested like every other cell.
"""

from __future__ import annotations

import math
import time
import warnings

import numpy as np
import torch
from torch import nn

C_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)  # inverse L2 strengths tried; the best on validation is kept
MAX_ITER = 2000


def _accuracy_and_loss(probs: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    return float((probs.argmax(1) == y).mean()), float(-np.log(np.maximum(probs[np.arange(len(y)), y], 1e-12)).mean())


def collapsed(pred, share: float = 0.9) -> bool:
    """One class predicted for more than `share` of the test set: the classifier learned a constant."""
    pred = np.asarray(pred)
    return bool(len(pred) and np.bincount(pred).max() > share * len(pred))


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def fit_logistic(x: dict[str, np.ndarray], y: dict[str, np.ndarray],
                 train_idx: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict]:
    """Multinomial logistic regression on standardised inputs, C chosen on val accuracy (ties: lower val loss).
    Returns (W [classes, d], b [classes]) acting on the raw inputs, and the record's fields.

    With n training examples in d >> n dimensions the L2-regularised solution lies in the span of the (standardised)
    training examples, so it is fitted exactly in those n coordinates (an SVD basis): the same optimum, far faster."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    xtr, ytr = x["train"][train_idx], y["train"][train_idx]
    classes = int(y["train"].max()) + 1
    mean, scale = xtr.mean(0), xtr.std(0)
    scale[scale == 0] = 1.0
    basis = np.linalg.svd((xtr - mean) / scale, full_matrices=False)[2]  # [r, d], r <= n
    probs = lambda w, b, split: _softmax(x[split] @ w.T + b)  # noqa: E731
    best: tuple | None  # ((val accuracy, -val loss), w, b, C, iterations)
    best, t0 = None, time.perf_counter()
    for c in C_GRID:
        # One thread: OpenMP threads spinning on busy cores cost 10x here (measured: 1.8 s vs 18-32 s per fit).
        with warnings.catch_warnings(), threadpool_limits(1):
            warnings.simplefilter("ignore", ConvergenceWarning)
            model = LogisticRegression(C=c, max_iter=MAX_ITER, tol=1e-6).fit(((xtr - mean) / scale) @ basis.T, ytr)
        w, b = np.zeros((classes, x["train"].shape[1])), np.full(classes, -1e4)  # absent classes: never predicted
        w[model.classes_] = (model.coef_ @ basis) / scale  # back to raw inputs: ((x - mean) / scale) @ basis.T @ coef.T
        b[model.classes_] = model.intercept_ - w[model.classes_] @ mean
        acc, loss = _accuracy_and_loss(probs(w, b, "val"), y["val"])
        if best is None or (acc, -loss) > best[0]:
            best = ((acc, -loss), w, b, c, int(np.max(model.n_iter_)))
    assert best is not None  # C_GRID is not empty
    _, w, b, c, n_iter = best
    fields: dict = {}
    for split in ("val", "test"):
        acc, loss = _accuracy_and_loss(probs(w, b, split), y[split])
        fields |= {f"{split}_acc": acc, f"{split}_loss": loss}
    train_acc, train_loss = _accuracy_and_loss(_softmax(xtr @ w.T + b), ytr)
    constant = collapsed(probs(w, b, "test").argmax(1))
    fields |= dict(train_acc=train_acc, train_loss_first=math.log(classes), train_loss_last=train_loss,
                   steps_taken=n_iter, budget_steps=MAX_ITER, best_step=n_iter, early_stopped=False,
                   collapsed=constant, converged=bool(n_iter < MAX_ITER and not constant), l2_C=c,
                   train_seconds=time.perf_counter() - t0)
    return w, b, fields


def fit_linear_probe(head: nn.Module, feats: dict[str, torch.Tensor], ys: dict[str, torch.Tensor],
                     idx: torch.Tensor) -> dict:
    """The probe solved to convergence; its weights are written into the linear `head` (tested like any cell)."""
    x = {s: v.double().cpu().numpy() for s, v in feats.items()}
    y = {s: v.cpu().numpy() for s, v in ys.items()}
    w, b, fields = fit_logistic(x, y, idx.cpu().numpy())
    linear = next(m for m in head.modules() if isinstance(m, nn.Linear))
    with torch.no_grad():
        linear.weight.copy_(torch.from_numpy(w))
        linear.bias.copy_(torch.from_numpy(b))
    return fields | dict(images_seen=len(idx) * fields["steps_taken"], images_per_second=float("nan"), curves=[])


def pixel_baseline(method: str, target, idx: torch.Tensor) -> dict:
    """A trivial baseline on the raw pixels (as the networks see them: resized, shifted, in [0, 1])."""
    x = {s: v.flatten(1).double().numpy() for s, v in target.x.items()}
    y = {s: v.numpy() for s, v in target.y.items()}
    train_idx = idx.numpy()
    if method == "logistic_pixels":
        return fit_logistic(x, y, train_idx)[2] | dict(curves=[])
    if method != "nearest_centroid":
        raise ValueError(f"unknown pixel baseline {method!r}")
    t0 = time.perf_counter()
    ytr = y["train"][train_idx]
    centroids = np.stack([x["train"][train_idx][ytr == c].mean(0) for c in range(len(target.classes))])
    nearest = lambda v: ((v[:, None, :] - centroids[None]) ** 2).sum(-1).argmin(1)  # noqa: E731
    fields = dict(train_acc=float((nearest(x["train"][train_idx]) == ytr).mean()))
    for split in ("val", "test"):
        pred = nearest(x[split])
        fields[f"{split}_acc"] = float((pred == y[split]).mean())
        fields[f"{split}_loss"] = float("nan")  # a nearest-centroid rule gives no probabilities
    constant = collapsed(pred)
    return fields | dict(steps_taken=0, budget_steps=0, best_step=0, early_stopped=False, collapsed=constant,
                         converged=not constant, train_seconds=time.perf_counter() - t0, curves=[])
