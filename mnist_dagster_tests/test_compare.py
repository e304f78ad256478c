"""The statistics behind the gate and the A/B report, on constructed data with known answers."""

import numpy as np
import pytest
from scipy import stats
from statsmodels.stats.contingency_tables import mcnemar

from mnist_dagster.ml.compare import mcnemar_exact, mcnemar_worse_p_value, wilson_interval


def predictions_with(labels: np.ndarray, candidate_only: int, production_only: int, both_wrong: int = 0):
    """Candidate and production predictions with exactly these discordant counts (the rest both right)."""
    wrong = (labels + 1) % 10
    candidate, production = labels.copy(), labels.copy()
    production[:candidate_only] = wrong[:candidate_only]
    block = slice(candidate_only, candidate_only + production_only)
    candidate[block] = wrong[block]
    both = slice(candidate_only + production_only, candidate_only + production_only + both_wrong)
    candidate[both], production[both] = wrong[both], wrong[both]
    return candidate, production


def test_mcnemar_counts_only_the_discordant_images_and_matches_the_exact_binomial():
    labels = np.arange(1000) % 10
    candidate, production = predictions_with(labels, candidate_only=10, production_only=30, both_wrong=50)
    result = mcnemar_exact(labels, candidate, production)
    assert (result.candidate_only, result.production_only) == (10, 30)
    assert result.candidate_accuracy == pytest.approx(1 - 80 / 1000)
    assert result.production_accuracy == pytest.approx(1 - 60 / 1000)
    # one-sided (is the candidate worse?): the binomial tail of production's 30 of 40 discordant images,
    # half of statsmodels' two-sided exact McNemar p-value on the same 2x2 table
    assert result.p_value == pytest.approx(stats.binomtest(30, 40, 0.5, alternative="greater").pvalue)
    table = [[910, 10], [30, 50]]  # [[both right, candidate only], [production only, both wrong]]
    two_sided = mcnemar(table, exact=True).pvalue
    assert result.p_value == pytest.approx(two_sided / 2)
    assert result.p_value < 0.01 and result.significantly_worse(0.05)
    assert mcnemar_worse_p_value(10, 30) == result.p_value


def test_mcnemar_does_not_call_a_small_or_favourable_difference_worse():
    labels = np.arange(10_000) % 10
    equal = mcnemar_exact(labels, *predictions_with(labels, 20, 20))
    assert equal.p_value == pytest.approx(stats.binomtest(20, 40, 0.5, alternative="greater").pvalue)
    assert equal.p_value > 0.5 and not equal.significantly_worse(0.05)
    slightly = mcnemar_exact(labels, *predictions_with(labels, 18, 24))  # 6 images in 10,000: noise
    assert slightly.candidate_is_worse and not slightly.significantly_worse(0.05)
    better = mcnemar_exact(labels, *predictions_with(labels, 40, 10))
    assert better.p_value > 0.99 and not better.significantly_worse(0.05)  # one-sided: better is never "worse"
    identical = mcnemar_exact(labels, labels, labels)
    assert identical.p_value == 1.0 and (identical.candidate_only, identical.production_only) == (0, 0)
    with pytest.raises(ValueError):
        mcnemar_exact(labels, labels[:5], labels)


def test_mcnemar_tests_one_sided_at_the_stated_alpha_not_at_half_of_it():
    """25 against 40 discordant images: the one-sided p (0.041) refuses at 0.05, where the two-sided p
    (0.082), compared with alpha, would have tested at 0.025 and let the worse candidate through."""
    labels = np.arange(10_000) % 10
    result = mcnemar_exact(labels, *predictions_with(labels, candidate_only=25, production_only=40))
    assert result.p_value == pytest.approx(0.0408, abs=1e-4) and result.significantly_worse(0.05)
    assert stats.binomtest(40, 65, 0.5).pvalue > 0.05  # the two-sided p the gate used to compare with alpha


def test_wilson_interval_known_values_and_edges():
    low, high = wilson_interval(81, 100)  # against scipy's own Wilson interval
    reference = stats.binomtest(81, 100).proportion_ci(confidence_level=0.95, method="wilson")
    assert (low, high) == pytest.approx((reference.low, reference.high))
    assert (round(low, 3), round(high, 3)) == (0.722, 0.875)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == pytest.approx(1.0)
    assert wilson_interval(0, 0) == (0.0, 1.0)
