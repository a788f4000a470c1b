"""Domain distances and transferability estimators: pure functions on arrays (no torch, no I/O).

A measure that is undefined for its input (constant features, too few samples) raises `Degenerate` with the
reason; `safely` turns that into NaN plus the reason, so a table says why a value is missing.
"""

from .degenerate import Degenerate, safely

from .distance import frechet_distance, gaussian_kl, mmd2_unbiased, proxy_a_distance
from .transferability import h_score, knn_accuracy, leep, logme, nce

__all__ = ["Degenerate", "safely", "frechet_distance", "gaussian_kl", "mmd2_unbiased", "proxy_a_distance", "h_score", "knn_accuracy",
           "leep", "logme", "nce"]
