"""The intervals of the summary tables, on cases whose answer is known by hand."""

import math

import numpy as np
import pytest

from orchestrator.common.stats import bootstrap_interval, mean_interval, paired_difference


def test_accuracy_interval_matches_the_normal_approximation():
    """400 examples, 300 right: the bootstrap sd of the mean is sqrt(0.75 * 0.25 / 400) =
    0.02165, so the 95% interval is about 0.75 +- 1.96 * 0.02165 = [0.7076, 0.7924]."""
    correct = [1] * 300 + [0] * 100
    iv = bootstrap_interval([correct], resamples=20000)
    assert iv.estimate == 0.75
    assert iv.low == pytest.approx(0.7076, abs=0.004) and iv.high == pytest.approx(0.7924, abs=0.004)


def test_a_set_without_spread_has_a_point_interval():
    iv = bootstrap_interval([[1, 1, 1, 1]])
    assert (iv.estimate, iv.low, iv.high) == (1.0, 1.0, 1.0)


def test_two_examples_give_the_enumerated_quantiles():
    """Resamples of [0, 1] have mean 0, 0.5 or 1 with probability 1/4, 1/2, 1/4: the 2.5%
    quantile is 0 and the 97.5% quantile is 1."""
    iv = bootstrap_interval([[0, 1]], resamples=20000)
    assert (iv.estimate, iv.low, iv.high) == (0.5, 0.0, 1.0)


def test_a_mean_over_sets_resamples_each_set_on_its_own():
    """Set A (100 examples, all right) has no spread, set B (100, half right) has sd 0.05:
    the mean over the two sets has sd 0.025 and its interval is 0.75 +- 0.049."""
    iv = bootstrap_interval([[1] * 100, [1] * 50 + [0] * 50], resamples=20000)
    assert iv.estimate == 0.75
    assert iv.low == pytest.approx(0.75 - 0.049, abs=0.004) and iv.high == pytest.approx(0.75 + 0.049, abs=0.004)


def test_paired_difference_is_narrower_than_the_unpaired_one():
    """Two models that agree on 390 of 400 examples and differ on 10 (a wins 8, b wins 2):
    the difference is 6/400 = 0.015; paired, its sd is sqrt(10/400 - 0.015^2)/20 = 0.0077,
    so the interval is about 0.015 +- 0.015; the two accuracies' own intervals are +- 0.04."""
    rng = np.random.default_rng(1)
    shared = (rng.random(390) < 0.8).astype(int)
    a = np.concatenate([shared, [1] * 8 + [0] * 2])
    b = np.concatenate([shared, [0] * 8 + [1] * 2])
    diff = paired_difference([a], [b], resamples=20000)
    assert diff.estimate == pytest.approx(0.015)
    assert diff.low == pytest.approx(0.0, abs=0.004) and diff.high == pytest.approx(0.030, abs=0.004)
    alone = bootstrap_interval([a], resamples=20000)
    assert alone.high - alone.low > 4 * (diff.high - diff.low) / 2


def test_identical_models_differ_by_exactly_zero():
    a = [[1, 0, 1, 1], [0, 1]]
    diff = paired_difference(a, a)
    assert (diff.estimate, diff.low, diff.high) == (0.0, 0.0, 0.0)


def test_paired_difference_needs_the_same_examples():
    with pytest.raises(ValueError):
        paired_difference([[1, 0]], [[1, 0, 1]])


def test_intervals_are_reproducible():
    data = [[1, 0, 1, 1, 0, 1, 1]]
    assert bootstrap_interval(data) == bootstrap_interval(data)


def test_mean_interval_over_seeds_is_student_t():
    """Values 1, 2, 3: mean 2, sd 1, t(0.975, 2) = 4.303, half-width 4.303 / sqrt(3) = 2.484."""
    iv = mean_interval([1.0, 2.0, 3.0])
    assert iv.estimate == 2.0
    assert iv.low == pytest.approx(2 - 2.4843, abs=1e-3) and iv.high == pytest.approx(2 + 2.4843, abs=1e-3)
    one = mean_interval([0.3])
    assert one.estimate == 0.3 and math.isnan(one.low) and math.isnan(one.high)
