"""Drift that alarms on harm: is a window of traffic still read as well as the reference, and if its inputs
moved, what moved? Plain numpy + scipy, no Dagster.

The reference is what serving saw, per input path (`DriftReference.paths`): held-out test digits the judged
traffic never contains, scored by the model being judged, as 28x28 pixels ("pixels": the JSON path and the
batch inbox's .npz arrays) and rendered as uploads through the upload recipe ("upload"). An operator may
replace a path's reference with a window of live traffic they accept.

`compare` sets a window against its path's reference in two levels:

- **alarm** (severity moderate/severe, `drift_detected`): the accuracy estimated without labels from the
  calibrated confidences (`ml.cbpe`) fell by at least `accuracy_drop` (1 point moderate, 3 severe) below the
  reference's estimate, and a one-sided Welch t-test on the confidences says the fall is not chance
  (p < `alpha`). Only harm pages someone.
- **info** (diagnosis): input statistics that say what changed - predicted class mix, confidence, ink,
  intensity, bounding box, centre - each by an effect size (PSI, KS's D) past its threshold AND a two-sample
  test (chi-square on bins merged until every expected count is >= 5, or KS) with p < `alpha`. Alone they
  never alarm: traffic may change in ways the model reads just as well.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Literal

import numpy as np
from scipy.ndimage import gaussian_filter, grey_dilation, grey_erosion
from scipy.ndimage import rotate as nd_rotate
from scipy.stats import chi2_contingency, ks_2samp, ttest_ind

from mnist_dagster.digits import MASS_CENTRE
from mnist_dagster.ml.cbpe import AccuracyEstimate, estimate_accuracy

FORMAT = "mnist-dagster/drift-reference-v2"
NUM_CLASSES = 10
INK = 0.5  # a pixel above half intensity is ink (MNIST strokes are near 1, the anti-aliased rim below)
FEATURE_BINS = 10  # reference deciles
CONFIDENCE_SAMPLE = 5000  # reference confidences kept (sorted); more are thinned to evenly spaced quantiles
CONFIDENCE_EDGES = np.linspace(0, 1, 21)  # the plot's confidence bins (the KS test needs none)
PSI_FLOOR = 1e-4  # a bin empty on one side would make PSI infinite
MIN_EXPECTED = 5.0  # chi-square's rule: every expected count at least 5, adjacent bins merged until so
Severity = Literal["none", "info", "moderate", "severe"]
SEVERITY_ORDER: dict[str, int] = {"none": 0, "info": 1, "moderate": 2, "severe": 3}
FEATURES = ("mean_ink", "ink_fraction", "bbox_height", "bbox_width", "centre_offset")
#: Input path of a logged prediction -> the reference it is judged against (the batch inbox's .npz are pixels).
REFERENCE_FOR_INPUT = {"json": "pixels", "batch": "pixels", "upload": "upload"}
INPUT_PATHS = tuple(REFERENCE_FOR_INPUT)


# ----- features -------------------------------------------------------------------------------------


def image_features(images: np.ndarray) -> dict[str, np.ndarray]:
    """Per image, float (N, 28, 28) in [0, 1], white ink on black: the shape of what the model sees.

    Ink amount (mean_ink: intensity; ink_fraction: pixels above half) moves with stroke width, blur and
    noise; the bounding box with rotation, scale and noise; the centre of mass's distance from MNIST's with
    off-centre digits. An image with no ink has a 0 x 0 box and its centre at the image centre."""
    images = np.asarray(images, dtype=np.float32).reshape(-1, 28, 28)
    ink = images > INK
    rows, cols = ink.any(axis=2), ink.any(axis=1)
    mass = images.sum(axis=(1, 2))
    safe = np.where(mass > 0, mass, 1.0)
    index = np.arange(28, dtype=np.float32)
    centre_row = np.where(mass > 0, (images.sum(axis=2) * index).sum(axis=1) / safe, MASS_CENTRE)
    centre_col = np.where(mass > 0, (images.sum(axis=1) * index).sum(axis=1) / safe, MASS_CENTRE)
    return {
        "mean_ink": images.mean(axis=(1, 2)),
        "ink_fraction": ink.mean(axis=(1, 2)),
        "bbox_height": _extent(rows),
        "bbox_width": _extent(cols),
        "centre_offset": np.hypot(centre_row - MASS_CENTRE, centre_col - MASS_CENTRE),
    }


def _extent(any_ink: np.ndarray) -> np.ndarray:
    """(N, 28) booleans -> last minus first True index plus one; 0 where there is none."""
    first = any_ink.argmax(axis=1)
    last = 27 - any_ink[:, ::-1].argmax(axis=1)
    return np.where(any_ink.any(axis=1), last - first + 1, 0).astype(np.float32)


# ----- the reference --------------------------------------------------------------------------------


@dataclass(frozen=True)
class BinnedReference:
    """A feature on the reference images: cut points (deciles, repeats merged) and the count in each bin."""

    cuts: list[float]
    counts: list[int]
    mean: float

    @property
    def proportions(self) -> list[float]:
        return _shares(self.counts)

    def bin_counts(self, values: np.ndarray) -> np.ndarray:
        """How many of `values` fall in each bin; the outer bins are open, so nothing falls outside."""
        return np.bincount(np.searchsorted(self.cuts, values, side="right"), minlength=len(self.cuts) + 1)


def binned_reference(values: np.ndarray, bins: int = FEATURE_BINS) -> BinnedReference:
    values = np.asarray(values, dtype=np.float64)
    cuts = [float(c) for c in np.unique(np.round(np.quantile(values, np.linspace(0, 1, bins + 1)[1:-1]), 6))]
    counts = BinnedReference(cuts, [], 0.0).bin_counts(values)
    return BinnedReference(cuts, [int(c) for c in counts], float(values.mean()))


@dataclass(frozen=True)
class PathReference:
    """One input path's reference: where its images came from, the model's answers on them (class counts,
    confidences, the accuracy CBPE expects) and the binned features of the images the model saw."""

    source: str
    class_counts: list[int]
    confidence_sample: list[float]
    expected_accuracy: float
    features: dict[str, BinnedReference]
    count: int


@dataclass(frozen=True)
class DriftReference:
    """What one model version's traffic is compared with: a `PathReference` per reference kind; JSON."""

    paths: dict[str, PathReference]
    format: str = FORMAT

    def for_input(self, input_path: str) -> PathReference:
        """The reference of a logged input path (`REFERENCE_FOR_INPUT`); pixels for one it does not know."""
        kind = REFERENCE_FOR_INPUT.get(input_path, "pixels")
        return self.paths.get(kind) or self.paths["pixels"]

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes) -> DriftReference:
        state = json.loads(data)
        if state.get("format") != FORMAT:
            raise ValueError(f"not a drift reference of format {FORMAT} (got {state.get('format')!r})")
        paths = {}
        for kind, value in state["paths"].items():
            features = {name: BinnedReference(**binned) for name, binned in value.pop("features").items()}
            paths[kind] = PathReference(features=features, **value)
        return cls(paths)


def path_reference(images: np.ndarray | None, digits: np.ndarray, confidences: np.ndarray, source: str) -> PathReference:
    """The reference of images (float (N, 28, 28) in [0, 1], or None where none were kept) that the model
    answered with `digits` at `confidences` (its calibrated top probabilities, as served)."""
    confidences = np.sort(np.asarray(confidences, dtype=np.float64).ravel())
    sample = confidences if len(confidences) <= CONFIDENCE_SAMPLE else np.quantile(
        confidences, np.linspace(0, 1, CONFIDENCE_SAMPLE)
    )  # fmt: skip
    features = {} if images is None or not len(images) else {
        name: binned_reference(values) for name, values in image_features(images).items()
    }  # fmt: skip
    return PathReference(
        source=source,
        class_counts=[int(c) for c in np.bincount(np.asarray(digits, np.int64), minlength=NUM_CLASSES)[:NUM_CLASSES]],
        confidence_sample=[round(float(c), 6) for c in sample],
        expected_accuracy=estimate_accuracy(confidences).accuracy,
        features=features,
        count=len(confidences),
    )


# ----- thresholds and results -----------------------------------------------------------------------


@dataclass(frozen=True)
class DriftThresholds:
    """Alarm on the estimated accuracy drop; inform on input statistics. Defaults measured with
    `benchmarks/drift_benchmark.py` on real MNIST (docs/monitoring-verdicts.md)."""

    alpha: float = 0.001  # significance every test must reach, besides its effect size
    accuracy_drop: tuple[float, float] = (0.01, 0.03)  # (moderate, severe): points of estimated accuracy lost
    class_psi: float = 0.1  # the customary PSI band for "changed"
    feature_psi: float = 0.1
    confidence_ks: float = 0.1  # KS's D


@dataclass(frozen=True)
class Statistic:
    """One comparison: what it tests, its effect size against the thresholds, its p-value, and its level:
    "alarm" statistics can be moderate or severe, "diagnosis" statistics at most info."""

    name: str
    test: str
    value: float
    p_value: float
    moderate: float
    severe: float
    alpha: float
    reference: str
    current: str
    level: str = "diagnosis"

    @property
    def severity(self) -> Severity:
        if not np.isfinite(self.value) or self.p_value >= self.alpha or self.value < self.moderate:
            return "none"
        if self.level == "diagnosis":
            return "info"
        return "severe" if self.value >= self.severe else "moderate"


@dataclass
class DriftReport:
    statistics: list[Statistic]
    traffic: int
    images: int  # the traffic with a logged image (the batch tables keep none)
    histograms: dict[str, tuple[list[float], list[float]]]  # name -> (reference, current) shares per bin
    estimate: AccuracyEstimate
    reference_accuracy: float
    extra: dict = field(default_factory=dict)

    @property
    def severity(self) -> Severity:
        return max((s.severity for s in self.statistics), key=SEVERITY_ORDER.__getitem__, default="none")

    @property
    def drift_detected(self) -> bool:
        """An alarm: the estimated accuracy fell; an info finding alone is not drift detected."""
        return SEVERITY_ORDER[self.severity] >= SEVERITY_ORDER["moderate"]

    def moved(self) -> list[Statistic]:
        """The statistics past a threshold, alarms first, then by how far past."""
        hits = [s for s in self.statistics if s.severity != "none"]
        return sorted(hits, key=lambda s: (-SEVERITY_ORDER[s.severity], -s.value / max(s.moderate, 1e-12)))


# ----- the tests ------------------------------------------------------------------------------------


def psi(reference: np.ndarray, current: np.ndarray) -> float:
    """Population stability index: sum over bins of (current - reference) * ln(current / reference), shares
    floored at `PSI_FLOOR`. 0 for identical distributions; 0.1 and 0.25 are the customary bands."""
    ref = np.maximum(np.asarray(reference, dtype=np.float64), PSI_FLOOR)
    cur = np.maximum(np.asarray(current, dtype=np.float64), PSI_FLOOR)
    ref, cur = ref / ref.sum(), cur / cur.sum()
    return float(np.sum((cur - ref) * np.log(cur / ref)))


def merge_bins(reference_counts: np.ndarray, current_counts: np.ndarray, min_expected: float = MIN_EXPECTED):
    """The 2 x K table of counts with adjacent bins merged, left to right, until every cell's expected count
    (row total x column total / grand total) is at least `min_expected`; a short tail joins the last bin."""
    table = np.array([reference_counts, current_counts], dtype=np.float64)
    rows, total = table.sum(axis=1), table.sum()
    if total == 0 or rows.min() == 0:
        return table[:, :0]
    need = min_expected * total / rows.min()  # a column total that gives both its cells >= min_expected
    merged, pending = [], np.zeros(2)
    for column in table.T:
        pending = pending + column
        if pending.sum() >= need:
            merged.append(pending)
            pending = np.zeros(2)
    if pending.sum():
        merged[-1:] = [merged[-1] + pending] if merged else [pending]
    return np.array(merged).T


def merged_chi_square(reference_counts: np.ndarray, current_counts: np.ndarray) -> tuple[float, int]:
    """Two-sample chi-square test of homogeneity (scipy's chi2_contingency, no continuity correction) on
    merged bins; (p, bins used). One bin left says nothing: p = 1."""
    table = merge_bins(reference_counts, current_counts)
    if table.shape[1] < 2:
        return 1.0, table.shape[1]
    return float(chi2_contingency(table, correction=False).pvalue), table.shape[1]


def accuracy_statistic(
    confidences: np.ndarray, reference: PathReference, thresholds: DriftThresholds
) -> tuple[Statistic, AccuracyEstimate]:
    """The alarm: estimated accuracy lost against the reference's, with a one-sided Welch t-test on the
    confidences (is the window's mean confidence lower than the reference's by more than chance?)."""
    estimate = estimate_accuracy(confidences)
    p_value = float(ttest_ind(reference.confidence_sample, confidences, equal_var=False, alternative="greater").pvalue)
    statistic = Statistic(
        "estimated_accuracy", "CBPE accuracy drop (points/100), one-sided Welch t-test on confidences",
        reference.expected_accuracy - estimate.accuracy, p_value, *thresholds.accuracy_drop, thresholds.alpha,
        reference=f"{reference.expected_accuracy:.2%}", current=estimate.text(), level="alarm",
    )  # fmt: skip
    return statistic, estimate


def class_statistic(digits: np.ndarray, reference: PathReference, thresholds: DriftThresholds) -> Statistic:
    counts = np.bincount(np.asarray(digits, dtype=np.int64), minlength=NUM_CLASSES)[:NUM_CLASSES]
    ref_shares, shares = np.array(_shares(reference.class_counts)), counts / max(1, counts.sum())
    worst = int(np.argmax(np.abs(shares - ref_shares)))
    p_value, bins = merged_chi_square(np.asarray(reference.class_counts), counts)
    return Statistic(
        "predicted_class", f"PSI + chi-square ({bins} merged bins, expected >= 5) vs reference answers",
        psi(ref_shares, shares), p_value, thresholds.class_psi, thresholds.class_psi, thresholds.alpha,
        reference=f"digit {worst}: {ref_shares[worst]:.1%}", current=f"digit {worst}: {shares[worst]:.1%}",
    )  # fmt: skip


def confidence_statistic(confidences: np.ndarray, reference: PathReference, thresholds: DriftThresholds) -> Statistic:
    result = ks_2samp(confidences, reference.confidence_sample)
    return Statistic(
        "confidence", "two-sample KS vs reference confidences", float(result.statistic), float(result.pvalue),
        thresholds.confidence_ks, thresholds.confidence_ks, thresholds.alpha,
        reference=f"median {np.median(reference.confidence_sample):.3f}", current=f"median {np.median(confidences):.3f}",
    )  # fmt: skip


def feature_statistic(
    name: str, values: np.ndarray, reference: BinnedReference, thresholds: DriftThresholds
) -> tuple[Statistic, list[float]]:
    counts = reference.bin_counts(values)
    p_value, bins = merged_chi_square(np.asarray(reference.counts), counts)
    statistic = Statistic(
        name, f"PSI + chi-square over reference deciles ({bins} merged bins, expected >= 5)",
        psi(reference.proportions, _shares(counts)), p_value, thresholds.feature_psi, thresholds.feature_psi,
        thresholds.alpha, reference=f"mean {reference.mean:.3g}", current=f"mean {np.mean(values):.3g}",
    )  # fmt: skip
    return statistic, _shares(counts)


def _shares(counts) -> list[float]:
    return [float(c) for c in np.asarray(counts, dtype=np.float64) / max(1, np.sum(counts))]


def compare(
    reference: PathReference,
    digits: np.ndarray,
    confidences: np.ndarray,
    images: np.ndarray | None,
    thresholds: DriftThresholds = DriftThresholds(),
) -> DriftReport:
    """Every statistic of a window of one path's traffic against that path's reference: `digits` and
    `confidences` of all of it, `images` (float (K, 28, 28) in [0, 1]) of the part that kept its image."""
    digits, confidences = np.asarray(digits), np.asarray(confidences, dtype=np.float64)
    accuracy, estimate = accuracy_statistic(confidences, reference, thresholds)
    statistics = [accuracy, class_statistic(digits, reference, thresholds),
                  confidence_statistic(confidences, reference, thresholds)]  # fmt: skip
    counts = np.bincount(digits.astype(np.int64), minlength=NUM_CLASSES)[:NUM_CLASSES]
    histograms = {
        "predicted_class": (_shares(reference.class_counts), _shares(counts)),
        "confidence": (
            _shares(np.histogram(reference.confidence_sample, CONFIDENCE_EDGES)[0]),
            _shares(np.histogram(confidences, CONFIDENCE_EDGES)[0]),
        ),
    }
    image_count = 0 if images is None else len(images)
    if image_count and reference.features:
        for name, values in image_features(images).items():
            statistic, shares = feature_statistic(name, values, reference.features[name], thresholds)
            statistics.append(statistic)
            histograms[name] = (reference.features[name].proportions, shares)
    return DriftReport(statistics, len(digits), image_count, histograms, estimate, reference.expected_accuracy)


# ----- shifts the thresholds are measured against ---------------------------------------------------


def rotate(images: np.ndarray, degrees: float) -> np.ndarray:
    """Each image turned about its centre (bilinear), background black."""
    return np.clip(nd_rotate(images, degrees, axes=(1, 2), reshape=False, order=1, mode="constant"), 0, 1)


def blur(images: np.ndarray, sigma: float) -> np.ndarray:
    """A Gaussian blur of `sigma` pixels: an out-of-focus photo or a soft brush."""
    return gaussian_filter(np.asarray(images, np.float32), sigma=(0, sigma, sigma))


def add_noise(images: np.ndarray, sigma: float, seed: int = 0) -> np.ndarray:
    """Gaussian pixel noise of standard deviation `sigma`, clipped to [0, 1]."""
    rng = np.random.default_rng(seed)
    return np.clip(images + rng.normal(0, sigma, images.shape), 0, 1).astype(np.float32)


def thicken(images: np.ndarray, size: int = 2) -> np.ndarray:
    """Strokes dilated by a `size` x `size` grey-level maximum: a fatter pen."""
    return grey_dilation(images, size=(1, size, size))


def erode(images: np.ndarray, size: int = 2) -> np.ndarray:
    """Strokes eroded by a `size` x `size` grey-level minimum: a thinner pen."""
    return grey_erosion(images, size=(1, size, size))


def shift(images: np.ndarray, pixels: int) -> np.ndarray:
    """Each digit moved `pixels` down and right, off the centre (what a client sending raw arrays might do)."""
    moved = np.zeros_like(images)
    moved[:, pixels:, pixels:] = images[:, : 28 - pixels, : 28 - pixels]
    return moved
