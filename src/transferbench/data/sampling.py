"""k-shot subsets: nested and stratified, so that for one seed the 20-shot set contains the 5-shot set."""

import numpy as np

from transferbench.core.errors import ConfigError


def class_counts(labels: np.ndarray) -> dict[int, int]:
    values, counts = np.unique(labels, return_counts=True)
    return dict(zip(values.tolist(), counts.tolist()))


def nested_kshot(labels: np.ndarray, n_per_class: int, seed: int, field: str = "grid.n_per_class") -> np.ndarray:
    """Indices of `n_per_class` examples of every class: the first k of a per-class permutation fixed by seed."""
    counts = class_counts(labels)
    smallest = min(counts.values())
    if n_per_class < 1 or n_per_class > smallest:
        raise ConfigError(field, f"{n_per_class} examples per class asked, but the smallest class holds {smallest}",
                          f"use a size between 1 and {smallest}")
    rng = np.random.default_rng(seed)
    picks = []
    for c in sorted(counts):  # one permutation per class, drawn in a fixed class order
        members = np.flatnonzero(labels == c)
        picks.append(members[rng.permutation(len(members))[:n_per_class]])
    return np.sort(np.concatenate(picks))
