"""The serving-path check covers uploads (`lifecycle.check.check_uploads`): real MNIST test digits (the check's
own, the first of the test set) rendered 28-400 px, both polarities, off-centre, PNG and JPEG, through the
upload recipe, against the same digits' pixels. A recipe broken in `scoring/preprocess.py` (no centring; wrong
polarity) is refused with the numbers."""

import numpy as np
import pytest

from mnist_dagster.lifecycle import check
from mnist_dagster.lifecycle.check import ServingCheckError
from mnist_dagster.scoring import preprocess
from mnist_dagster.scoring.bundle import Predictor
from mnist_dagster_tests.serving_support import real_model, real_test_set
from mnist_dagster_tests.support import generated_digits


def _no_centring(box: np.ndarray) -> np.ndarray:
    field = np.zeros((28, 28), np.float32)
    field[: box.shape[0], : box.shape[1]] = box
    return field


@pytest.fixture(scope="module")
def model_and_digits(real_mnist_dir):
    _, _, test_images, test_labels = real_test_set(real_mnist_dir)
    return Predictor(real_model(real_mnist_dir)), test_images[:400], test_labels[:400]


def _gap(predictor, images, labels) -> float:
    return check.compare_uploads(predictor, images, labels).gap


@pytest.mark.parametrize(
    "breakage, target, replacement",
    [
        ("no centring", "_centre_by_mass", _no_centring),
        ("wrong polarity", "_border", lambda pixels: np.zeros(4, np.float32)),  # every background counts as dark
    ],
)
def test_a_broken_upload_recipe_is_refused_with_the_numbers(
    model_and_digits, monkeypatch, breakage, target, replacement
):
    predictor, images, labels = model_and_digits
    faithful_gap = _gap(predictor, images, labels)
    monkeypatch.setattr(preprocess, target, replacement)
    with pytest.raises(ServingCheckError, match=r"uploads read worse than pixels: .* of 400 test digits") as refused:
        check.check_uploads(predictor, images, labels)
    broken = refused.value.uploads  # the numbers travel with the error, for the gate's metadata
    assert broken.images == 400 and broken.refused and broken.p_value <= check.UPLOAD_ALPHA
    assert f"a gap of {broken.gap:.2%}" in str(refused.value)
    assert broken.gap > faithful_gap + 0.05, (breakage, faithful_gap, broken.gap)  # the check tells them apart


def test_the_upload_check_reads_in_words_with_its_numbers(model_and_digits):
    predictor, images, labels = model_and_digits
    result = check.compare_uploads(predictor, images, labels)
    metadata = check.upload_check_metadata(result)
    assert metadata["upload_check_images"] == 400
    assert metadata["upload_check_pixel_accuracy"] == result.pixel_accuracy
    assert metadata["upload_check_upload_accuracy"] == result.upload_accuracy
    assert metadata["upload_check_gap_points"] == round(100 * result.gap, 2)
    assert metadata["upload_check_p_value"] == result.p_value and metadata["upload_check_alpha"] == 0.01
    assert "one-sided" in metadata["upload_check_test"] and "McNemar" in metadata["upload_check_test"]
    assert "a refusal stops a deployment" in metadata["upload_check_alpha_why"]
    sentence = metadata["upload_check"]
    assert (
        f"{result.pixel_accuracy:.2%} as 28x28 pixels" in sentence
        and f"{result.upload_accuracy:.2%} as uploads" in sentence
    )
    assert "points" in sentence and "one-sided exact McNemar" in sentence and "p <= 0.01" in sentence
    skipped = check.upload_check_metadata(None)
    assert skipped == {"upload_check": "not run: the check images are not MNIST-format digits (ink in the outer frame)"}


def test_the_whole_serving_check_runs_the_upload_comparison_on_mnist_digits(model_and_digits, monkeypatch):
    predictor, images, labels = model_and_digits
    monkeypatch.setattr(preprocess, "_centre_by_mass", _no_centring)
    with pytest.raises(ServingCheckError, match="uploads read worse"):
        check.check_serving_path(predictor, images[:100], labels[:100])


def test_generated_patterns_are_not_rendered_as_uploads():
    patterns, _ = generated_digits(50, seed=3)
    assert not check.mnist_format_digits(patterns)
