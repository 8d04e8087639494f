"""Class-incremental metrics: pure functions of the accuracy matrix (README, Protocol and metrics).

acc[t][j] is the accuracy (%) after task t on the test images of task j (j <= t), n[j] the number of those
images. Tasks are 0-indexed here.
"""
from __future__ import annotations

import numpy as np


def _square(acc) -> np.ndarray:
    a = np.full((len(acc), len(acc)), np.nan)
    for t, row in enumerate(acc):
        a[t, : len(row)] = row[: t + 1]
    return a


def accuracy_curve(acc, n) -> list[float]:
    """a_t: per-sample accuracy over all seen classes, sum_j n_j a_tj / sum_j n_j."""
    a, n = _square(acc), np.asarray(n, dtype=np.float64)
    return [float(np.dot(a[t, : t + 1], n[: t + 1]) / n[: t + 1].sum()) for t in range(len(a))]


def last_accuracy(acc, n) -> float:
    """A_T = a_T."""
    return accuracy_curve(acc, n)[-1]


def average_incremental_accuracy(acc, n) -> float:
    """A-bar = (1/T) sum_t a_t, stage 1 included."""
    return float(np.mean(accuracy_curve(acc, n)))


def forgetting(acc) -> float:
    """Chaudhry: mean over j < T of max_{t in [j, T-1)} a_tj - a_Tj (0 for one task)."""
    a, T = _square(acc), len(acc)
    return float(np.mean([a[j : T - 1, j].max() - a[T - 1, j] for j in range(T - 1)])) if T > 1 else 0.0


def forgetting_pilot(acc) -> float:
    """PILOT: the max also runs over the last row, so every term is >= 0."""
    a, T = _square(acc), len(acc)
    return float(np.mean([a[j:T, j].max() - a[T - 1, j] for j in range(T - 1)])) if T > 1 else 0.0


def backward_transfer(acc) -> float:
    """BWT = mean over j < T of a_Tj - a_jj."""
    a, T = _square(acc), len(acc)
    return float(np.mean([a[T - 1, j] - a[j, j] for j in range(T - 1)])) if T > 1 else 0.0


def summary(acc, n) -> dict:
    return {"curve": accuracy_curve(acc, n), "last_acc": last_accuracy(acc, n),
            "avg_inc_acc": average_incremental_accuracy(acc, n), "forgetting": forgetting(acc),
            "forgetting_pilot": forgetting_pilot(acc), "bwt": backward_transfer(acc)}
