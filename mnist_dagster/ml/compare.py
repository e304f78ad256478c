"""Comparing two models honestly on the same images (McNemar, one-sided), and an interval for an accuracy
(Wilson). The A/B decision on live traffic is sequential: `lifecycle/sequential.py`.

Plain numpy and scipy; no Dagster. Each result says which test it ran, on what counts, and what it found,
so the gate's and the A/B report's metadata can show a person the reasoning, not just a verdict.
"""

from __future__ import annotations

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
    """The Wilson score interval for a proportion (scipy's `binomtest(...).proportion_ci`): sound at small
    n and near 0 or 1, unlike the normal one."""
    if trials == 0:
        return (0.0, 1.0)
    interval = stats.binomtest(successes, trials).proportion_ci(confidence_level=confidence, method="wilson")
    return (max(0.0, float(interval.low)), min(1.0, float(interval.high)))
