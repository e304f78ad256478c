"""The drift statistics (`ml/drift.py`) and the label-free accuracy (`ml/cbpe.py`): the pieces on constructed
data, both ways; then on real MNIST and a real model (the served ONNX graph of `ml.train.fit`, its temperature
fitted on its validation split and inside the graph), the issue's behaviour per input path.

Where images come from, so that a reference and what is judged against it never share one:
- generated digits: references from seed 11, judged windows from seeds 12 and up;
- real MNIST: the reference is built by `lifecycle.reference` from every fifth test image (the pipeline's
  own rule); judged windows are the other 8,000 (`judged_indices`).
"""

import numpy as np
import pytest
from scipy.stats import chi2_contingency
from statsmodels.stats.proportion import proportion_confint

from mnist_dagster.lifecycle.reference import build_serving_reference, judged_indices
from mnist_dagster.ml import cbpe, drift
from mnist_dagster.scoring.bundle import Predictor
from mnist_dagster.scoring.uploads import as_uploads, through_upload_recipe, typical_styles
from mnist_dagster_tests.serving_support import real_model, real_test_set
from mnist_dagster_tests.support import generated_digits


def confidences(count: int, a: float = 60.0, seed: int = 0) -> np.ndarray:
    """Top-probability-like values piled up near 1 (a beta(a, 1), mean a / (a + 1)); smaller `a`, less sure."""
    return np.random.default_rng(seed).beta(a, 1, count)


@pytest.fixture(scope="module")
def reference() -> drift.PathReference:
    images, labels = generated_digits(4000, seed=11)
    return drift.path_reference(images / 255, labels, confidences(4000, seed=1), "generated digits, seed 11")


def window(seed: int, a: float = 60.0, count: int = 1000):
    images, labels = generated_digits(count, seed=seed)
    return labels, confidences(count, a, seed), images / 255


# ----- the pieces ------------------------------------------------------------------------------------


def test_bins_merge_until_every_expected_count_is_at_least_five():
    reference_counts, current_counts = np.array([1, 2, 50, 60, 3, 1, 80, 2]), np.array([0, 1, 40, 70, 2, 2, 90, 1])
    table = drift.merge_bins(reference_counts, current_counts)
    expected = table.sum(axis=1, keepdims=True) * table.sum(axis=0) / table.sum()
    assert expected.min() >= 5 and table.sum() == reference_counts.sum() + current_counts.sum()
    assert table.shape[1] < len(reference_counts)
    p_value, bins = drift.merged_chi_square(reference_counts, current_counts)
    assert bins == table.shape[1] and p_value == pytest.approx(chi2_contingency(table, correction=False).pvalue)
    assert drift.merged_chi_square(np.array([3, 0]), np.array([2, 1])) == (1.0, 1)  # too few: one bin, no test


def test_cbpe_interval_is_the_poisson_binomial_one_and_realised_is_wilson():
    p = np.array([0.9, 0.99, 0.6, 0.8])
    estimate = cbpe.estimate_accuracy(p)
    half = 1.959964 * np.sqrt(np.sum(p * (1 - p))) / 4  # the high side is clipped at 1 here
    assert estimate.accuracy == pytest.approx(p.mean()) and estimate.accuracy - estimate.low == pytest.approx(half)
    realised = cbpe.realised_accuracy(90, 100)
    assert (realised.low, realised.high) == pytest.approx(proportion_confint(90, 100, 0.05, method="wilson"))
    assert cbpe.realised_accuracy(0, 0) is None


def test_reference_round_trips_and_names_its_source(reference):
    whole = drift.DriftReference({"pixels": reference})
    again = drift.DriftReference.from_json(whole.to_json())
    assert again == whole and len(whole.to_json()) < 100_000
    assert again.for_input("batch") == again.for_input("upload") == reference  # no upload reference: pixels
    with pytest.raises(ValueError, match="format"):
        drift.DriftReference.from_json(b'{"format": "mnist-dagster/drift-reference-v1"}')


def test_traffic_like_the_reference_raises_nothing(reference):
    for seed in range(12, 17):
        report = drift.compare(reference, *window(seed))
        assert report.severity == "none", [(s.name, s.value, s.p_value) for s in report.moved()]


def test_less_sure_answers_are_an_alarm_graded_by_the_estimated_drop(reference):
    moderate = drift.compare(reference, *window(17, a=30.0))  # 0.968 against 0.984: 1.6 points
    severe = drift.compare(reference, *window(18, a=12.0))  # 0.923: 6 points
    assert (moderate.severity, severe.severity) == ("moderate", "severe")
    assert moderate.drift_detected and moderate.moved()[0].name == "estimated_accuracy"


def test_changed_inputs_read_as_surely_are_info_naming_what_changed(reference):
    digits, sure, images = window(19)
    report = drift.compare(reference, digits, sure, drift.thicken(images, 3))
    assert report.severity == "info" and not report.drift_detected
    assert {"mean_ink", "ink_fraction"} <= {s.name for s in report.moved()}
    flooded = drift.compare(reference, np.where(np.arange(1000) < 500, 1, digits), sure, images)
    assert flooded.severity == "info" and [s.name for s in flooded.moved()] == ["predicted_class"]


def test_a_large_drop_on_a_few_predictions_is_not_significant_so_no_alarm(reference):
    digits, sure, images = window(20, a=12.0, count=8)
    assert drift.compare(reference, digits, sure, images).severity == "none"


def test_thresholds_are_config(reference):
    loose = drift.DriftThresholds(accuracy_drop=(0.5, 0.9))
    report = drift.compare(reference, *window(21, a=12.0), loose)
    assert report.severity == "info" and [s.name for s in report.moved()] == ["confidence"]  # the drop is below 50


# ----- real MNIST, a real model --------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(real_mnist_dir):
    """(the served graph, calibration inside, its reference, judged test images, their labels)."""
    _, _, test_images, test_labels = real_test_set(real_mnist_dir)
    model = Predictor(real_model(real_mnist_dir))
    reference = build_serving_reference(model, test_images)
    judged = judged_indices(len(test_images))
    return model, reference, test_images[judged], test_labels[judged].astype(np.int64)


def _answers(model, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    probabilities = model.predict_proba(images.reshape(-1, 1, 28, 28).astype(np.float32))
    return probabilities.argmax(axis=1), probabilities.max(axis=1)


def test_cbpe_agrees_with_the_realised_accuracy_on_labelled_test_traffic(served):
    model, _, images, labels = served
    for part in np.array_split(np.arange(len(labels)), 4):  # four windows of 2,000
        digits, confidence = _answers(model, images[part] / 255)
        estimate = cbpe.estimate_accuracy(confidence)
        realised = cbpe.realised_accuracy(int((digits == labels[part]).sum()), len(part))
        assert estimate.overlaps(realised), (estimate.text(), realised.text())  # agree within their intervals
        assert abs(estimate.accuracy - realised.accuracy) < 0.01  # and within a point


def test_each_path_is_quiet_against_its_own_reference_and_harm_alarms(served):
    model, reference, images, _ = served
    pixels = images[:1000] / 255
    uploads = through_upload_recipe(as_uploads(images[1000:2000], typical_styles(1000, seed=99)))
    for path, window_images in (("json", pixels), ("upload", uploads)):
        report = drift.compare(reference.for_input(path), *_answers(model, window_images), window_images)
        assert not report.drift_detected, (path, [(s.name, s.value, s.p_value) for s in report.moved()])
    rotated = drift.rotate(images[2000:3000] / 255, 45)
    report = drift.compare(reference.for_input("json"), *_answers(model, rotated), rotated)
    assert report.drift_detected and report.moved()[0].name == "estimated_accuracy"
