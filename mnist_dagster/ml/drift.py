"""Drift statistics: is the traffic a model sees since its last check still like what it was trained and
tested on? Plain numpy + scipy, no Dagster.

A `DriftReference` is taken once, when a model is evaluated (training labels and images, the model's
confidences on the test set), kept compact (proportions in bins, a few thousand floats at most) and
saved beside the production version. `compare` then sets a window of traffic against it:

- predicted digits against the training labels: PSI (how far) and a chi-square goodness of fit (whether
  the difference is more than chance);
- confidences against the test set's: two-sample Kolmogorov-Smirnov (its statistic D, how far, and its p);
- the low-confidence rate against the test set's: the difference (how far) and a one-sided binomial test;
- input features of the preprocessed images (mean ink, ink fraction, bounding-box height and width,
  the centre of mass's offset) against the training images: PSI over the training deciles (whole-pixel
  bins for the offset), with the chi-square over the same bins.

Every statistic alarms only when its effect size passes a threshold AND the test says it is not chance
(p < `alpha`): p alone would alarm on harmless differences once traffic is large, and the effect size alone
would alarm on noise when traffic is small. The thresholds were chosen on real MNIST traffic
(`benchmarks/drift_benchmark.py`; the README has the measured table).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np

FORMAT = "mnist-dagster/drift-reference-v1"
NUM_CLASSES = 10
INK = 0.5  # a pixel above half intensity is ink (MNIST strokes are near 1, the anti-aliased rim below)
FEATURE_BINS = 10  # training deciles: each bin holds a tenth of the training images
CONFIDENCE_SAMPLE = 2000  # test-set confidences kept: the KS statistic's resolution is 1/2000
CONFIDENCE_EDGES = np.linspace(0, 1, 21)  # the plot's confidence bins (the KS test needs none)
PSI_FLOOR = 1e-4  # a bin empty on one side would make PSI infinite
Severity = Literal["none", "moderate", "severe"]
SEVERITY_ORDER: dict[str, int] = {"none": 0, "moderate": 1, "severe": 2}
FEATURES = ("mean_ink", "ink_fraction", "bbox_height", "bbox_width", "centre_offset")
#: Where MNIST puts a digit's centre of mass (row, column), measured on its training images: 13.997, 14.006.
MNIST_CENTRE = (14.0, 14.0)
#: The centre's bins are whole pixels, not deciles: MNIST centres every digit, so its offsets span 0.3 px, and
#: deciles that narrow would alarm on the half-pixel by which the serving recipe centres differently (it
#: places the centre at 13.5), which the model does not notice; an off-centre digit moves pixels.
OFFSET_CUTS = (1.5, 2.5, 4.0)


# ----- features -------------------------------------------------------------------------------------


def image_features(images: np.ndarray) -> dict[str, np.ndarray]:
    """Per image, float (N, 28, 28) in [0, 1], white ink on black: the shape of what the model sees.

    Ink amount (mean_ink, ink_fraction) moves with thick or thin strokes and with noise; the bounding box
    (rows and columns holding ink) with rotation, scale and noise; the centre of mass's distance from
    MNIST's (centre_offset, pixels) with off-centre digits. An image with no ink has a 0 x 0 box and its
    centre at the image centre."""
    images = np.asarray(images, dtype=np.float32).reshape(-1, 28, 28)
    ink = images > INK
    rows, cols = ink.any(axis=2), ink.any(axis=1)
    mass = images.sum(axis=(1, 2))
    safe = np.where(mass > 0, mass, 1.0)
    index = np.arange(28, dtype=np.float32)
    centre_row = np.where(mass > 0, (images.sum(axis=2) * index).sum(axis=1) / safe, MNIST_CENTRE[0])
    centre_col = np.where(mass > 0, (images.sum(axis=1) * index).sum(axis=1) / safe, MNIST_CENTRE[1])
    return {
        "mean_ink": images.mean(axis=(1, 2)),
        "ink_fraction": ink.mean(axis=(1, 2)),
        "bbox_height": _extent(rows),
        "bbox_width": _extent(cols),
        "centre_offset": np.hypot(centre_row - MNIST_CENTRE[0], centre_col - MNIST_CENTRE[1]),
    }


def _extent(any_ink: np.ndarray) -> np.ndarray:
    """(N, 28) booleans -> last minus first True index plus one; 0 where there is none."""
    first = any_ink.argmax(axis=1)
    last = 27 - any_ink[:, ::-1].argmax(axis=1)
    return np.where(any_ink.any(axis=1), last - first + 1, 0).astype(np.float32)


# ----- the reference --------------------------------------------------------------------------------


@dataclass(frozen=True)
class BinnedReference:
    """A feature's training distribution: the cut points between bins (training deciles, repeats merged:
    a discrete feature such as the box height has fewer) and the training share in each bin."""

    cuts: list[float]
    proportions: list[float]
    mean: float
    std: float

    def counts(self, values: np.ndarray) -> np.ndarray:
        """How many of `values` fall in each bin; the outer bins are open, so nothing falls outside."""
        return np.bincount(np.searchsorted(self.cuts, values, side="right"), minlength=len(self.cuts) + 1)


@dataclass(frozen=True)
class DriftReference:
    """What a model's traffic is compared with, for one model version; JSON, a few tens of KB."""

    class_proportions: list[float]  # training labels
    features: dict[str, BinnedReference]  # training images
    confidence_sample: list[float]  # the model's max softmax probability on the test set, sorted
    train_count: int
    test_count: int
    format: str = FORMAT

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes) -> DriftReference:
        state = json.loads(data)
        if state.get("format") != FORMAT:
            raise ValueError(f"not a drift reference of format {FORMAT} (got {state.get('format')!r})")
        features = {name: BinnedReference(**value) for name, value in state.pop("features").items()}
        return cls(features=features, **state)


def binned_reference(values: np.ndarray, bins: int = FEATURE_BINS, cuts: tuple[float, ...] = ()) -> BinnedReference:
    """Cut points at the quantiles of `values` (repeats merged) unless `cuts` are given, and the share of
    `values` in each bin."""
    values = np.asarray(values, dtype=np.float64)
    inner = np.quantile(values, np.linspace(0, 1, bins + 1)[1:-1]) if not cuts else np.asarray(cuts)
    cuts = np.unique(np.round(inner, 6))
    reference = BinnedReference([float(c) for c in cuts], [], float(values.mean()), float(values.std()))
    counts = reference.counts(values)
    return BinnedReference(reference.cuts, [float(p) for p in counts / counts.sum()], reference.mean, reference.std)


def build_reference(train_images: np.ndarray, train_labels: np.ndarray, test_confidences: np.ndarray) -> DriftReference:
    """The reference for one model: training images (float (N, 28, 28) in [0, 1]) and labels, and the
    model's confidence on each test image. Kept compact: binned features, class shares, and the test
    confidences as at most `CONFIDENCE_SAMPLE` evenly spaced quantiles."""
    labels = np.asarray(train_labels).astype(np.int64).ravel()
    features = image_features(train_images)
    confidences = np.sort(np.asarray(test_confidences, dtype=np.float64).ravel())
    if len(confidences) > CONFIDENCE_SAMPLE:
        confidences = np.quantile(confidences, np.linspace(0, 1, CONFIDENCE_SAMPLE))
    return DriftReference(
        class_proportions=[float(p) for p in np.bincount(labels, minlength=NUM_CLASSES) / max(1, len(labels))],
        features={
            name: binned_reference(values, cuts=OFFSET_CUTS if name == "centre_offset" else ())
            for name, values in features.items()
        },
        confidence_sample=[round(float(c), 6) for c in confidences],
        train_count=len(labels),
        test_count=len(np.asarray(test_confidences).ravel()),
    )


# ----- thresholds and results -----------------------------------------------------------------------


@dataclass(frozen=True)
class DriftThresholds:
    """Where an effect becomes moderate or severe drift. Defaults from `benchmarks/drift_benchmark.py` on
    real MNIST: the clean test set in chunks of 1,000 stays below every moderate threshold, while rotation
    by 45 degrees, heavy noise, thickened or eroded strokes each pass at least one severe threshold."""

    alpha: float = 0.001  # significance each test must reach, besides its effect size
    class_psi: tuple[float, float] = (0.1, 0.25)  # (moderate, severe): the customary PSI bands
    feature_psi: tuple[float, float] = (0.35, 0.7)  # clean test chunks reach 0.24 (mean ink): MNIST's test
    #                                                 writers differ from its training writers that much
    confidence_ks: tuple[float, float] = (0.15, 0.3)
    low_confidence: float = 0.5  # below even odds: with label smoothing, a sure answer is ~0.9, not 1.0
    low_confidence_rise: tuple[float, float] = (0.05, 0.15)  # rate minus the test set's rate


@dataclass(frozen=True)
class Statistic:
    """One comparison: what it tests, its effect size against the thresholds, and its p-value."""

    name: str
    test: str
    value: float
    p_value: float
    moderate: float
    severe: float
    alpha: float
    reference: str  # a short summary of each side, for the table and the Slack message
    current: str

    @property
    def severity(self) -> Severity:
        """Severe or moderate when the effect passes that threshold and p < alpha; otherwise none."""
        if not np.isfinite(self.value) or self.p_value >= self.alpha:
            return "none"
        return "severe" if self.value >= self.severe else "moderate" if self.value >= self.moderate else "none"


@dataclass
class DriftReport:
    statistics: list[Statistic]
    traffic: int
    images: int  # the traffic with a logged image (the batch tables keep none)
    histograms: dict[str, tuple[list[float], list[float]]]  # name -> (reference, current) shares per bin

    @property
    def severity(self) -> Severity:
        return max((s.severity for s in self.statistics), key=SEVERITY_ORDER.__getitem__, default="none")

    @property
    def drift_detected(self) -> bool:
        return self.severity != "none"

    def moved(self) -> list[Statistic]:
        """The statistics past a threshold, worst first."""
        hits = [s for s in self.statistics if s.severity != "none"]
        return sorted(hits, key=lambda s: (-SEVERITY_ORDER[s.severity], -s.value / max(s.severe, 1e-12)))


# ----- the tests ------------------------------------------------------------------------------------


def psi(reference: np.ndarray, current: np.ndarray) -> float:
    """Population stability index: sum over bins of (current - reference) * ln(current / reference), shares
    floored at `PSI_FLOOR`. 0 for identical distributions; 0.1 and 0.25 are the customary bands."""
    ref = np.maximum(np.asarray(reference, dtype=np.float64), PSI_FLOOR)
    cur = np.maximum(np.asarray(current, dtype=np.float64), PSI_FLOOR)
    ref, cur = ref / ref.sum(), cur / cur.sum()
    return float(np.sum((cur - ref) * np.log(cur / ref)))


def chi_square_p(counts: np.ndarray, reference: np.ndarray) -> float:
    """Goodness of fit of observed `counts` to the reference shares (scipy's chisquare); bins the reference
    never fills are floored like PSI's so one stray value does not make p zero by division."""
    from scipy.stats import chisquare

    counts = np.asarray(counts, dtype=np.float64)
    shares = np.maximum(np.asarray(reference, dtype=np.float64), PSI_FLOOR)
    expected = shares / shares.sum() * counts.sum()
    return float(chisquare(counts, expected).pvalue)


def class_statistic(digits: np.ndarray, reference: DriftReference, thresholds: DriftThresholds) -> Statistic:
    counts = np.bincount(np.asarray(digits, dtype=np.int64), minlength=NUM_CLASSES)[:NUM_CLASSES]
    shares = counts / max(1, counts.sum())
    worst = int(np.argmax(np.abs(shares - reference.class_proportions)))
    return Statistic(
        "predicted_class", "PSI + chi-square vs training labels", psi(reference.class_proportions, shares),
        chi_square_p(counts, reference.class_proportions), *thresholds.class_psi, thresholds.alpha,
        reference=f"digit {worst}: {reference.class_proportions[worst]:.1%}",
        current=f"digit {worst}: {shares[worst]:.1%}",
    )  # fmt: skip


def confidence_statistic(confidences: np.ndarray, reference: DriftReference, thresholds: DriftThresholds) -> Statistic:
    from scipy.stats import ks_2samp

    result = ks_2samp(confidences, reference.confidence_sample)
    return Statistic(
        "confidence", "two-sample KS vs test-set confidences", float(result.statistic), float(result.pvalue),
        *thresholds.confidence_ks, thresholds.alpha,
        reference=f"median {np.median(reference.confidence_sample):.3f}",
        current=f"median {np.median(confidences):.3f}",
    )  # fmt: skip


def low_confidence_statistic(
    confidences: np.ndarray, reference: DriftReference, thresholds: DriftThresholds
) -> Statistic:
    """The share below `thresholds.low_confidence` against the test set's: only a rise is drift."""
    from scipy.stats import binomtest

    limit = thresholds.low_confidence
    reference_rate = float(np.mean(np.asarray(reference.confidence_sample) < limit))
    low = int(np.sum(np.asarray(confidences) < limit))
    rate = low / max(1, len(confidences))
    p_value = binomtest(low, len(confidences), min(max(reference_rate, 1e-6), 1 - 1e-6), alternative="greater").pvalue
    return Statistic(
        "low_confidence_rate", f"rise in share < {limit} (one-sided binomial)", rate - reference_rate,
        float(p_value), *thresholds.low_confidence_rise, thresholds.alpha,
        reference=f"{reference_rate:.1%}", current=f"{rate:.1%}",
    )  # fmt: skip


def feature_statistic(
    name: str, values: np.ndarray, reference: BinnedReference, thresholds: DriftThresholds
) -> tuple[Statistic, list[float]]:
    counts = reference.counts(values)
    shares = counts / max(1, counts.sum())
    bins = "pixel bins" if name == "centre_offset" else "training deciles"
    statistic = Statistic(
        name, f"PSI + chi-square over {bins}", psi(reference.proportions, shares),
        chi_square_p(counts, reference.proportions), *thresholds.feature_psi, thresholds.alpha,
        reference=f"mean {reference.mean:.3g}", current=f"mean {np.mean(values):.3g}",
    )  # fmt: skip
    return statistic, [float(s) for s in shares]


def _shares(counts: np.ndarray) -> list[float]:
    return [float(c) for c in np.asarray(counts) / max(1, np.sum(counts))]


def compare(
    reference: DriftReference,
    digits: np.ndarray,
    confidences: np.ndarray,
    images: np.ndarray | None,
    thresholds: DriftThresholds = DriftThresholds(),
) -> DriftReport:
    """Every statistic of a window of traffic: `digits` and `confidences` of all of it, `images` (float
    (K, 28, 28) in [0, 1]) of the part that kept its image; with none, the feature statistics are left out."""
    digits, confidences = np.asarray(digits), np.asarray(confidences, dtype=np.float64)
    statistics = [
        class_statistic(digits, reference, thresholds),
        confidence_statistic(confidences, reference, thresholds),
        low_confidence_statistic(confidences, reference, thresholds),
    ]
    counts = np.bincount(digits.astype(np.int64), minlength=NUM_CLASSES)[:NUM_CLASSES]
    histograms = {
        "predicted_class": (reference.class_proportions, _shares(counts)),
        "confidence": (
            _shares(np.histogram(reference.confidence_sample, CONFIDENCE_EDGES)[0]),
            _shares(np.histogram(confidences, CONFIDENCE_EDGES)[0]),
        ),
    }
    image_count = 0 if images is None else len(images)
    if image_count:
        for name, values in image_features(images).items():
            statistic, shares = feature_statistic(name, values, reference.features[name], thresholds)
            statistics.append(statistic)
            histograms[name] = (reference.features[name].proportions, shares)
    return DriftReport(statistics, len(digits), image_count, histograms)


# ----- shifts the thresholds are measured against ---------------------------------------------------


def rotate(images: np.ndarray, degrees: float) -> np.ndarray:
    """Each image turned about its centre (scipy.ndimage, bilinear), background black."""
    from scipy.ndimage import rotate as nd_rotate

    return np.clip(nd_rotate(images, degrees, axes=(1, 2), reshape=False, order=1, mode="constant"), 0, 1)


def add_noise(images: np.ndarray, sigma: float, seed: int = 0) -> np.ndarray:
    """Gaussian pixel noise of standard deviation `sigma`, clipped to [0, 1]."""
    rng = np.random.default_rng(seed)
    return np.clip(images + rng.normal(0, sigma, images.shape), 0, 1).astype(np.float32)


def thicken(images: np.ndarray, size: int = 2) -> np.ndarray:
    """Strokes dilated by a `size` x `size` grey-level maximum: a fatter pen."""
    from scipy.ndimage import grey_dilation

    return grey_dilation(images, size=(1, size, size))


def shift(images: np.ndarray, pixels: int) -> np.ndarray:
    """Each digit moved `pixels` down and right, off the centre (what a client sending raw arrays might do)."""
    moved = np.zeros_like(images)
    moved[:, pixels:, pixels:] = images[:, : 28 - pixels, : 28 - pixels]
    return moved


def erode(images: np.ndarray, size: int = 2) -> np.ndarray:
    """Strokes eroded by a `size` x `size` grey-level minimum: a thinner pen."""
    from scipy.ndimage import grey_erosion

    return grey_erosion(images, size=(1, size, size))
