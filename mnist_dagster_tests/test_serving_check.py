"""The serving-path check covers uploads (`lifecycle.check.check_uploads`): real MNIST test digits (the check's
own, the first of the test set) rendered 28-400 px, both polarities, off-centre, PNG and JPEG, through the
upload recipe, against the same digits' pixels. A recipe broken in `scoring/preprocess.py` (no centring; wrong
polarity) is refused with the numbers."""

import numpy as np
import pytest

from mnist_dagster.lifecycle import check
from mnist_dagster.scoring import preprocess
from mnist_dagster.scoring.bundle import Predictor
from mnist_dagster.lifecycle.check import ServingCheckError
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
    try:
        return check.check_uploads(predictor, images, labels).gap
    except ServingCheckError as error:
        assert "uploads read worse than pixels" in str(error) and "of 400 test digits" in str(error)
        return float(str(error).split("a gap of ")[1].split("%")[0]) / 100


@pytest.mark.parametrize(
    "breakage, target, replacement",
    [
        ("no centring", "_centre_by_mass", _no_centring),
        ("wrong polarity", "_border", lambda pixels: np.zeros(4, np.float32)),  # every background counts as dark
    ],
)
def test_a_broken_upload_recipe_is_refused_with_the_numbers(model_and_digits, monkeypatch, breakage, target, replacement):
    predictor, images, labels = model_and_digits
    faithful_gap = _gap(predictor, images, labels)
    monkeypatch.setattr(preprocess, target, replacement)
    with pytest.raises(ServingCheckError, match=r"uploads read worse than pixels: .* of 400 test digits") as refused:
        check.check_uploads(predictor, images, labels)
    broken_gap = float(str(refused.value).split("a gap of ")[1].split("%")[0]) / 100
    assert broken_gap > faithful_gap + 0.05, (breakage, faithful_gap, broken_gap)  # the check tells them apart


def test_the_whole_serving_check_runs_the_upload_comparison_on_mnist_digits(model_and_digits, monkeypatch):
    predictor, images, labels = model_and_digits
    monkeypatch.setattr(preprocess, "_centre_by_mass", _no_centring)
    with pytest.raises(ServingCheckError, match="uploads read worse"):
        check.check_serving_path(predictor, images[:100], labels[:100])


def test_generated_patterns_are_not_rendered_as_uploads():
    patterns, _ = generated_digits(50, seed=3)
    assert not check.mnist_format_digits(patterns)
