"""The drift statistics (`ml/drift.py`) on constructed distributions, both ways; then, on real MNIST and a
real model, the issue's required behaviour: the clean test set in ten chunks raises at most one alarm,
and rotated, noisy, thickened or eroded digits each raise one."""

import numpy as np
import pytest

from mnist_dagster.ml import drift
from mnist_dagster_tests.support import generated_digits

RNG = np.random.default_rng(0)


def confidences(count: int, a: float = 30.0, seed: int = 0) -> np.ndarray:
    """Max-softmax-like values piled up near 1 (a beta(a, 1)); a smaller `a` is a less sure model."""
    return np.random.default_rng(seed).beta(a, 1, count)


@pytest.fixture(scope="module")
def reference() -> drift.DriftReference:
    images, labels = generated_digits(6000, seed=11)
    return drift.build_reference(images / 255, labels, confidences(10_000, seed=1))


def by_name(report: drift.DriftReport) -> dict[str, drift.Statistic]:
    return {statistic.name: statistic for statistic in report.statistics}


# ----- the pieces ------------------------------------------------------------------------------------


def test_features_of_a_drawn_block_and_of_an_empty_image():
    block = np.zeros((2, 28, 28), np.float32)
    block[0, 4:8, 10:16] = 1.0  # rows 4-7, columns 10-15
    features = drift.image_features(block)
    assert features["bbox_height"].tolist() == [4, 0] and features["bbox_width"].tolist() == [6, 0]
    assert features["ink_fraction"][0] == pytest.approx(24 / 784) and features["mean_ink"][0] == pytest.approx(24 / 784)
    assert features["centre_offset"].tolist() == pytest.approx([np.hypot(14 - 5.5, 14 - 12.5), 0])


def test_psi_is_zero_for_equal_shares_and_matches_its_formula():
    assert drift.psi([0.5, 0.5], [0.5, 0.5]) == 0
    assert drift.psi([0.5, 0.5], [0.25, 0.75]) == pytest.approx(0.25 * np.log(2) + 0.25 * np.log(1.5))


def test_reference_is_compact_and_round_trips(reference):
    payload = reference.to_json()
    assert len(payload) < 50_000  # binned features and 2,000 confidences, not the training images
    assert len(reference.confidence_sample) == drift.CONFIDENCE_SAMPLE and reference.test_count == 10_000
    assert drift.DriftReference.from_json(payload) == reference
    assert sum(reference.class_proportions) == pytest.approx(1)
    with pytest.raises(ValueError, match="not a drift reference"):
        drift.DriftReference.from_json(b'{"format": "something-else"}')


# ----- both ways -------------------------------------------------------------------------------------


def test_traffic_like_the_reference_raises_nothing(reference):
    images, _ = generated_digits(1000, seed=12)
    predicted = RNG.choice(10, 1000, p=reference.class_proportions)
    report = drift.compare(reference, predicted, confidences(1000, seed=2), images / 255)
    assert report.severity == "none", [(s.name, s.value, s.p_value) for s in report.statistics]
    assert {s.name for s in report.statistics} == {
        "predicted_class",
        "confidence",
        "low_confidence_rate",
        *drift.FEATURES,
    }
    assert report.traffic == 1000 and report.images == 1000


def test_one_digit_flooding_the_traffic_is_severe_class_drift(reference):
    predicted = np.where(RNG.random(1000) < 0.5, 1, RNG.integers(0, 10, 1000))  # half the traffic says 1
    statistic = by_name(drift.compare(reference, predicted, confidences(1000, seed=3), None))["predicted_class"]
    assert statistic.severity == "severe" and statistic.value > 0.25 and statistic.p_value < 1e-6
    assert statistic.current.startswith("digit 1")


def test_a_less_sure_model_moves_the_confidence_and_the_low_confidence_rate(reference):
    statistics = by_name(drift.compare(reference, RNG.integers(0, 10, 1000), confidences(1000, a=1.5, seed=4), None))
    assert statistics["confidence"].severity == "severe"  # beta(1.5, 1) against beta(30, 1): D about 0.9
    assert statistics["low_confidence_rate"].severity == "severe"  # below 0.5: 35% against 0%
    slightly = by_name(drift.compare(reference, RNG.integers(0, 10, 1000), confidences(1000, a=25, seed=5), None))
    assert slightly["confidence"].severity == "none" and slightly["low_confidence_rate"].severity == "none"


@pytest.mark.parametrize(
    "shift, moved",
    [
        (lambda x: drift.thicken(x, 3), "ink_fraction"),
        (lambda x: drift.erode(x, 2), "ink_fraction"),
        (lambda x: drift.add_noise(x, 0.3), "mean_ink"),
        (lambda x: drift.shift(x, 4), "centre_offset"),
    ],
)
def test_shifted_images_move_their_features(reference, shift, moved):
    images, _ = generated_digits(1000, seed=13)
    report = drift.compare(reference, RNG.integers(0, 10, 1000), confidences(1000, seed=6), shift(images / 255))
    assert by_name(report)[moved].severity == "severe"
    assert report.moved()[0].severity == "severe" and report.drift_detected


def test_a_large_effect_on_a_few_predictions_is_not_significant_so_not_drift(reference):
    """PSI of 20 predictions is mostly noise: the chi-square's p keeps it from alarming."""
    predicted = np.array([1, 1, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1, 2, 3, 4, 5, 6, 7, 8])
    statistic = by_name(drift.compare(reference, predicted, confidences(20, seed=7), None))["predicted_class"]
    assert statistic.value > 0.1 and statistic.p_value > 0.001 and statistic.severity == "none"


def test_thresholds_are_config(reference):
    images, _ = generated_digits(1000, seed=14)
    loose = drift.DriftThresholds(feature_psi=(50.0, 100.0))
    report = drift.compare(
        reference, RNG.integers(0, 10, 1000), confidences(1000, seed=8), drift.thicken(images / 255, 3), loose
    )
    assert all(s.severity == "none" for s in report.statistics if s.name in drift.FEATURES)


# ----- real MNIST, a real model ----------------------------------------------------------------------


def test_real_mnist_clean_chunks_stay_quiet_and_shifted_digits_alarm(real_mnist_dir):
    """The production architecture, one epoch on 10k real images (~97%): the test set as ten windows of
    1,000 raises at most one alarm; 1,000 test digits rotated 45 degrees, with heavy noise, thickened or
    eroded each raise one."""
    from mnist_dagster.scoring.bundle import Predictor
    from mnist_dagster_tests.serving_support import real_model, real_test_set

    train_images, train_labels, test_images, _ = real_test_set(real_mnist_dir)
    predictor = Predictor(real_model(real_mnist_dir))

    def serve(unit: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        probabilities = predictor.predict_proba(unit.reshape(-1, 1, 28, 28).astype(np.float32))
        return probabilities.argmax(1), probabilities.max(1)

    test_unit = test_images / np.float32(255)
    digits, sure = serve(test_unit)
    reference = drift.build_reference(train_images / np.float32(255), train_labels, sure)
    alarms = [
        drift.compare(reference, digits[i : i + 1000], sure[i : i + 1000], test_unit[i : i + 1000]).drift_detected
        for i in range(0, 10_000, 1000)
    ]
    assert sum(alarms) <= 1, alarms
    chosen = np.random.default_rng(7).choice(10_000, 1000, replace=False)
    for name, shifted in {
        "rotated 45": drift.rotate(test_unit[chosen], 45),
        "noise 0.3": drift.add_noise(test_unit[chosen], 0.3),
        "thickened": drift.thicken(test_unit[chosen], 2),
        "eroded": drift.erode(test_unit[chosen], 2),
        "off centre by 3 px": drift.shift(test_unit[chosen], 3),
    }.items():
        shifted = np.rint(shifted * 255) / 255  # the uint8 round trip of the prediction log
        report = drift.compare(reference, *serve(shifted), shifted)
        assert report.drift_detected, (name, [(s.name, round(s.value, 3), s.p_value) for s in report.statistics])
