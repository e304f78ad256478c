"""Comparing two models honestly: on the same images (McNemar), and on live traffic (two proportions).

Plain numpy and scipy; no Dagster. Each result says which test it ran, on what counts, and what it found,
so the gate's and the A/B report's metadata can show a person the reasoning, not just a verdict.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats


MCNEMAR_ONE_SIDED = (
    "McNemar's exact test, one-sided (alternative: the candidate is less accurate): the exact binomial tail "
    "on the images only one model got right"
)


@dataclass(frozen=True)
class PairedComparison:
    """McNemar's exact test of a candidate against production on the same labelled images, one-sided.

    Only the discordant images carry information: `candidate_only` right by the candidate alone,
    `production_only` right by production alone. Under "equally accurate", each discordant image is a
    fair coin. The gate's question is one-sided (is the candidate worse?), so `p_value` is the exact
    binomial tail P(production alone right on >= `production_only` of the discordant images): a refusal
    at `p_value <= alpha` has level alpha, not the alpha / 2 a two-sided p-value would give.
    """

    images: int
    candidate_accuracy: float
    production_accuracy: float
    candidate_only: int
    production_only: int
    p_value: float

    @property
    def candidate_is_worse(self) -> bool:
        return self.production_only > self.candidate_only

    def significantly_worse(self, alpha: float) -> bool:
        """The one-sided test rejects "not worse" at level `alpha`."""
        return self.p_value <= alpha


def mcnemar_exact(labels: np.ndarray, candidate: np.ndarray, production: np.ndarray) -> PairedComparison:
    """Compare two models' predicted digits on the same `labels`."""
    labels, candidate, production = np.asarray(labels), np.asarray(candidate), np.asarray(production)
    if not (labels.shape == candidate.shape == production.shape) or labels.ndim != 1:
        raise ValueError(f"need three equal-length 1-d arrays, got {labels.shape}, {candidate.shape}, {production.shape}")
    candidate_right, production_right = candidate == labels, production == labels
    candidate_only = int((candidate_right & ~production_right).sum())
    production_only = int((production_right & ~candidate_right).sum())
    p_value = mcnemar_worse_p_value(candidate_only, production_only)
    return PairedComparison(
        images=len(labels),
        candidate_accuracy=float(candidate_right.mean()) if len(labels) else float("nan"),
        production_accuracy=float(production_right.mean()) if len(labels) else float("nan"),
        candidate_only=candidate_only,
        production_only=production_only,
        p_value=p_value,
    )


def mcnemar_worse_p_value(candidate_only: int, production_only: int) -> float:
    """McNemar's exact one-sided p-value for "the candidate is less accurate", from the discordant counts
    (scipy's binomial test, alternative `greater` on production's share of them)."""
    discordant = candidate_only + production_only
    if discordant == 0:
        return 1.0
    return float(stats.binomtest(production_only, discordant, 0.5, alternative="greater").pvalue)


def wilson_interval(successes: int, trials: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval for a proportion: sound at small n and near 0 or 1, unlike the normal one."""
    if trials == 0:
        return (0.0, 1.0)
    z = float(stats.norm.ppf(0.5 + confidence / 2))
    p = successes / trials
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / (1 + z * z / trials)
    return (max(0.0, float(centre - half)), min(1.0, float(centre + half)))


@dataclass(frozen=True)
class TwoProportions:
    """A two-sided two-proportion z-test (pooled variance) of arm B's accuracy against arm A's."""

    successes_a: int
    trials_a: int
    successes_b: int
    trials_b: int
    z: float
    p_value: float

    @property
    def difference(self) -> float:
        """B's accuracy minus A's."""
        return self.successes_b / self.trials_b - self.successes_a / self.trials_a


def two_proportion_test(successes_a: int, trials_a: int, successes_b: int, trials_b: int) -> TwoProportions:
    if min(trials_a, trials_b) == 0:
        raise ValueError("each arm needs at least one labelled prediction")
    pooled = (successes_a + successes_b) / (trials_a + trials_b)
    spread = math.sqrt(pooled * (1 - pooled) * (1 / trials_a + 1 / trials_b))
    difference = successes_b / trials_b - successes_a / trials_a
    if spread == 0:  # both arms all right or all wrong: no evidence either way
        z, p_value = 0.0, 1.0
    else:
        z = difference / spread
        p_value = float(2 * stats.norm.sf(abs(z)))
    return TwoProportions(successes_a, trials_a, successes_b, trials_b, z, p_value)
