"""Domain distances and transferability estimators: pure functions on arrays (no torch, no I/O), one registry.

A measure that is undefined for its input (constant features, too few samples) raises `Degenerate` with the
reason; `safely` turns that into NaN plus the reason, so a table says why a value is missing.

Adding a measure is one registered function here: `MEASURES.register(name, inputs=..., sign=..., label=...)`.
`inputs` says what `domains.py` feeds it -- "pair" (target and source-reference features, in a fixed PCA basis),
"labelled" (target features and labels), "labelled_pair" (target features and labels, and the labelled source
reference, both in the PCA basis), "source" (the source head's probabilities and labels) or "bn_profile"
(the per-group BatchNorm divergence of the target); `sign` is the direction it should have against the realized
gain (-1: grows as transfer gets harder); `label` names it in figures. Tables, the estimator ranking, figures and
the report all read this registry.
"""

import numpy as np

from transferbench.core.registry import Registry
from transferbench.measures.degenerate import Degenerate, safely
from transferbench.measures.distance import (
    frechet_distance,
    gaussian_kl,
    mmd2_unbiased,
    otdd_gaussian,
    proxy_a_distance,
)
from transferbench.measures.transferability import gbc, h_score, knn_accuracy, leep, logme, nce

MEASURES = Registry("measure")
LABEL_FREE = ("pair", "bn_profile")  # measured on the target's unlabelled images

MEASURES.register("fd", inputs="pair", sign=-1, label="Frechet distance")(frechet_distance)
MEASURES.register("mmd", inputs="pair", sign=-1, label="MMD^2")(mmd2_unbiased)
MEASURES.register("pad", inputs="pair", sign=-1, label="proxy A-distance")(proxy_a_distance)


@MEASURES.register("bn_kl_mean", inputs="bn_profile", sign=-1, label="mean BN divergence")
def bn_kl_mean(profile: list[float]) -> float:
    """Mean over depth groups of the KL of target activation statistics from the BatchNorm running statistics."""
    return float(np.nanmean(profile))


MEASURES.register("logme", inputs="labelled", sign=1, label="LogME")(logme)
MEASURES.register("leep", inputs="source", sign=1, label="LEEP")(leep)


@MEASURES.register("nce", inputs="source", sign=1, label="NCE")
def nce_of_probs(source_probs: np.ndarray, labels: np.ndarray) -> float:
    """NCE on the source head's hard predictions."""
    return nce(source_probs.argmax(1), labels)


MEASURES.register("h_score", inputs="labelled", sign=1, label="H-score")(h_score)
MEASURES.register("knn_acc", inputs="labelled", sign=1, label="kNN accuracy")(knn_accuracy)
MEASURES.register("gbc", inputs="labelled", sign=1, label="GBC")(gbc)
MEASURES.register("otdd", inputs="labelled_pair", sign=-1, label="OTDD (Gaussian)")(otdd_gaussian)


def measures(*inputs: str) -> list[str]:
    """Names of the registered measures taking these inputs (all of them when none are given), in order."""
    return [name for name, _ in MEASURES.items() if not inputs or MEASURES.meta(name)["inputs"] in inputs]


def signs() -> dict[str, int]:
    return {name: MEASURES.meta(name)["sign"] for name in measures()}


__all__ = ["Degenerate", "safely", "MEASURES", "LABEL_FREE", "measures", "signs", "frechet_distance", "gaussian_kl",
           "mmd2_unbiased", "otdd_gaussian", "proxy_a_distance",
           "gbc", "h_score", "knn_accuracy", "leep", "logme", "nce"]
