"""Accuracy without labels: confidence-based performance estimation (CBPE), as NannyML's CBPE does it, written
here by hand because nannyml cannot be installed beside this project (its dependencies s3fs/aiobotocore,
FLAML and lightgbm conflict with boto3). Plain numpy + scipy + statsmodels, no Dagster.

If a model's probabilities are calibrated, the chance that its answer on image i is right is its top
probability p_i, so a window's expected accuracy is the mean of p_i. How far the realised accuracy can fall
from it is the spread of a sum of independent Bernoulli(p_i) (a Poisson-binomial): variance
sum p_i (1 - p_i) / n^2; the interval is the normal approximation to it at `level`. It holds only as well as
the calibration does: that is why the confidences must be the calibrated ones the endpoint serves.

Where labels came back (feedback), the realised accuracy is shown beside the estimate with a Wilson interval
(statsmodels' `proportion_confint`), which keeps its coverage near 0 and 1 where accuracy lives.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy.stats import norm
from statsmodels.stats.proportion import proportion_confint

LEVEL = 0.95
CBPE_METHOD = "CBPE: mean top probability, Poisson-binomial normal interval"
WILSON_METHOD = "realised: correct / labelled, Wilson interval"


@dataclass(frozen=True)
class AccuracyEstimate:
    """An accuracy with its interval at `level`, over `count` predictions, and how it was obtained."""

    accuracy: float
    low: float
    high: float
    count: int
    level: float
    method: str

    def overlaps(self, other: AccuracyEstimate) -> bool:
        return self.low <= other.high and other.low <= self.high

    def text(self) -> str:
        return f"{self.accuracy:.2%} [{self.low:.2%}, {self.high:.2%}] of {self.count}"

    def as_dict(self) -> dict:
        return {key: round(value, 5) if isinstance(value, float) else value for key, value in asdict(self).items()}


def estimate_accuracy(confidences: np.ndarray, level: float = LEVEL) -> AccuracyEstimate:
    """The expected accuracy of predictions whose calibrated top probabilities are `confidences`."""
    p = np.asarray(confidences, dtype=np.float64).ravel()
    if not len(p):
        return AccuracyEstimate(float("nan"), float("nan"), float("nan"), 0, level, CBPE_METHOD)
    mean = float(p.mean())
    half = float(norm.ppf(0.5 + level / 2) * np.sqrt(np.sum(p * (1 - p))) / len(p))
    return AccuracyEstimate(mean, max(0.0, mean - half), min(1.0, mean + half), len(p), level, CBPE_METHOD)


def realised_accuracy(correct: int, count: int, level: float = LEVEL) -> AccuracyEstimate | None:
    """`correct` of `count` labelled predictions were right; None without labels."""
    if count <= 0:
        return None
    low, high = proportion_confint(correct, count, alpha=1 - level, method="wilson")
    return AccuracyEstimate(correct / count, float(low), float(high), count, level, WILSON_METHOD)
