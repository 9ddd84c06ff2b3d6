"""Bootstrap confidence intervals for evaluation metrics, single and paired (pure numpy).

A metric is a statistic of per-item rows: `values` is [n] (one number per prompt, e.g. 1 = refused)
or [n, k] (several numbers per item, e.g. BBQ's "biased" and "not unknown" flags), and `statistic`
maps such an array to one number. The percentile bootstrap resamples the n items with replacement
B times with a seeded generator:

    value = statistic(values)
    ci95  = [q_2.5, q_97.5] of { statistic(values[idx_b]) : b = 1..B },  idx_b ~ Uniform{0..n-1}^n

Two models measured on the SAME items (same prompts, same rows) get a paired bootstrap: each
resample draws one index set and applies it to both, so the item-to-item variation they share
cancels out of the difference:

    delta = statistic(a) - statistic(b)
    delta_ci95 = [q_2.5, q_97.5] of { statistic(a[idx_b]) - statistic(b[idx_b]) }
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

Statistic = Callable[[np.ndarray], float]
DEFAULT_RESAMPLES = 1000


def mean(values: np.ndarray) -> float:
    """The plain mean over items (a rate when the values are 0/1); nan for no items."""
    values = np.asarray(values, np.float64)
    return float(values.mean()) if len(values) else float("nan")


def _resample_indices(n: int, resamples: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def _percentile_interval(samples: np.ndarray) -> tuple[float, float]:
    finite = samples[np.isfinite(samples)]
    if not len(finite):
        return float("nan"), float("nan")
    low, high = np.percentile(finite, [2.5, 97.5])
    return float(low), float(high)


def bootstrap_ci(values: np.ndarray, statistic: Statistic = mean, resamples: int = DEFAULT_RESAMPLES,
                 seed: int = 0) -> tuple[float, float]:
    """95 % percentile-bootstrap interval of statistic(values) over items (rows of `values`)."""
    values = np.asarray(values, np.float64)
    if len(values) == 0:
        return float("nan"), float("nan")
    samples = np.array([statistic(values[idx]) for idx in _resample_indices(len(values), resamples, seed)])
    return _percentile_interval(samples)


def paired_difference_ci(values_a: np.ndarray, values_b: np.ndarray, statistic: Statistic = mean,
                         resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> tuple[float, float]:
    """95 % paired-bootstrap interval of statistic(a) - statistic(b); row i of a and b is the same item."""
    values_a, values_b = np.asarray(values_a, np.float64), np.asarray(values_b, np.float64)
    if len(values_a) != len(values_b):
        raise ValueError(f"paired bootstrap: {len(values_a)} items against {len(values_b)}; pair the same items")
    if len(values_a) == 0:
        return float("nan"), float("nan")
    samples = np.array([statistic(values_a[idx]) - statistic(values_b[idx])
                        for idx in _resample_indices(len(values_a), resamples, seed)])
    return _percentile_interval(samples)


def win_value(p_better: np.ndarray) -> np.ndarray:
    """Per-item win: 1 if p > 0.5, 0.5 if p == 0.5 (a tie counts half), 0 otherwise."""
    p_better = np.asarray(p_better, np.float64)
    return np.where(p_better > 0.5, 1.0, np.where(p_better == 0.5, 0.5, 0.0))
