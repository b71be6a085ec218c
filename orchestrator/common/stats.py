"""Uncertainty for the summary tables: pure functions, no I/O.

Accuracies here come from a few hundred eval examples, so a difference of one or two points
can be noise. Every table row gets a 95% bootstrap interval over its eval examples, a
dish's difference to the best individual gets a paired one (both models' per-example
results resampled together), and the LR study's sensitivity an interval over seeds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import stats as scipy_stats

RESAMPLES = 4000
LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    estimate: float
    low: float
    high: float

    def __str__(self) -> str:
        return f"{self.estimate:.4f} [{self.low:.3f}, {self.high:.3f}]"


def _resampled_means(values: np.ndarray, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """The means of `resamples` bootstrap resamples (n draws with replacement) of `values`.

    Eval results take few distinct values (correct 0/1; a paired difference -1/0/1), so a
    resample is a multinomial draw of how often each value appears: exact, and fast for
    thousands of examples."""
    distinct, counts = np.unique(values, return_counts=True)
    drawn = rng.multinomial(len(values), counts / len(values), size=resamples)
    return drawn @ distinct / len(values)


def bootstrap_interval(sets: Sequence[Sequence[float]], resamples: int = RESAMPLES, level: float = LEVEL,
                       seed: int = 0) -> Interval:
    """Percentile bootstrap interval of the mean over `sets` of each set's mean.

    One set: an accuracy (per-example 0/1). Several: a mean accuracy over eval sets (the
    mean OOD accuracy), each set resampled on its own, as they were drawn on their own. A
    paired difference of two models is the same call on their per-example differences:
    resampling the differences resamples both models' results together. Seeded: the same
    input gives the same interval."""
    arrays = [np.asarray(s, dtype=float) for s in sets]
    if not arrays or any(a.size == 0 for a in arrays):
        raise ValueError("bootstrap of an empty set")
    rng = np.random.default_rng(seed)
    means = np.mean([_resampled_means(a, resamples, rng) for a in arrays], axis=0)
    tail = (1 - level) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return Interval(float(np.mean([a.mean() for a in arrays])), float(low), float(high))


def paired_difference(a: Sequence[Sequence[float]], b: Sequence[Sequence[float]], **kwargs) -> Interval:
    """Mean of `a` minus mean of `b` (per set, the same examples in the same order), with
    its paired bootstrap interval."""
    if len(a) != len(b) or any(len(x) != len(y) for x, y in zip(a, b)):
        raise ValueError("a paired difference needs the same examples on both sides")
    return bootstrap_interval([np.asarray(x, dtype=float) - np.asarray(y, dtype=float) for x, y in zip(a, b)],
                              **kwargs)


def mean_interval(values: Sequence[float], level: float = LEVEL) -> Interval:
    """Student-t interval of a mean over a few independent repeats (seeds): NaN bounds for
    one value. With 2 or 3 seeds the interval is wide, which is the honest answer."""
    arr = np.asarray(values, dtype=float)
    mean = float(arr.mean()) if arr.size else float("nan")
    if arr.size < 2:
        return Interval(mean, float("nan"), float("nan"))
    half = scipy_stats.t.ppf((1 + level) / 2, arr.size - 1) * arr.std(ddof=1) / np.sqrt(arr.size)
    return Interval(mean, mean - half, mean + half)
