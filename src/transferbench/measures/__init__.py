"""Domain distances and transferability estimators: pure functions on arrays (no torch, no I/O)."""

from .distance import frechet_distance, gaussian_kl, mmd2_unbiased, proxy_a_distance
from .transferability import h_score, knn_accuracy, leep, logme, nce

__all__ = ["frechet_distance", "gaussian_kl", "mmd2_unbiased", "proxy_a_distance", "h_score", "knn_accuracy",
           "leep", "logme", "nce"]
