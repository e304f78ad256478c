"""The upload recipe (`scoring.preprocess.prepare_upload`) gives back the MNIST digit that was uploaded: real
test digits rendered as uploads (`scoring.uploads.render_upload`) come back with MNIST's centre of mass (pixel
14, 14 in 0-based indices), pixel for pixel at 28 px. The recipe used to aim at the field's middle (13.5): every
upload sat half a pixel up and left of MNIST's digits. `benchmarks/upload_recipe_benchmark.py` has the figures."""

import numpy as np
import pytest

from mnist_dagster.scoring import preprocess
from mnist_dagster.scoring.uploads import UploadStyle, render_upload, through_upload_recipe

DIGITS = slice(2000, 2300)  # not the serving check's (0-999)


def centre_of_mass(images: np.ndarray) -> np.ndarray:
    """(N, 28, 28) -> (N, 2) rows and columns in 0-based pixel indices."""
    index = np.arange(28, dtype=np.float64)
    total = images.sum(axis=(1, 2))
    return np.stack([images.sum(axis=2) @ index / total, images.sum(axis=1) @ index / total], axis=1)


def as_uploaded(digits: np.ndarray, style: UploadStyle) -> np.ndarray:
    return through_upload_recipe([render_upload(digit, style) for digit in digits])


def test_mnist_puts_the_centre_of_mass_where_the_recipe_aims(real_digits):
    images, _ = real_digits
    assert centre_of_mass(images.astype(np.float64)).mean(axis=0) == pytest.approx(
        [preprocess.MASS_CENTRE] * 2, abs=0.02
    )


def test_an_mnist_digit_uploaded_at_28_px_black_on_white_comes_back_in_place(real_digits):
    """In place to the pixel; what differs is the recipe's stretch (a peak of 254 becomes 255) and the faint
    fringe below its 10% ink level, cropped away."""
    images, _ = real_digits
    digits = images[DIGITS]
    returned = as_uploaded(digits, UploadStyle(28, light_background=True))
    original = digits.astype(np.float32) / 255
    in_place = np.hypot(*(centre_of_mass(returned) - centre_of_mass(original)).T) < 0.05
    assert in_place.mean() >= 0.98, f"only {in_place.mean():.0%} come back where they were"
    assert np.abs(returned - original).mean() < 0.002  # the old recipe: 0.057, every digit half a pixel off


@pytest.mark.parametrize("light_background", [False, True], ids=["white on black", "black on white"])
def test_an_mnist_digit_uploaded_at_280_px_keeps_mnists_centre_of_mass(real_digits, light_background):
    images, _ = real_digits
    digits = images[DIGITS]
    returned = as_uploaded(digits, UploadStyle(280, light_background))
    original = digits.astype(np.float32) / 255
    offset = centre_of_mass(returned) - centre_of_mass(original)
    assert np.abs(offset.mean(axis=0)).max() < 0.1, f"centre of mass off by {offset.mean(axis=0)} px on average"
    assert np.abs(returned - original).mean() < 0.04  # the old recipe: 0.060; the size known exactly: 0.009


def test_the_old_aim_would_put_every_upload_half_a_pixel_up_and_left(real_digits, monkeypatch):
    """The test above is not blind: aimed at the field's middle, the recipe fails it."""
    images, _ = real_digits
    digits = images[DIGITS]
    monkeypatch.setattr(preprocess, "MASS_CENTRE", 13.5)
    offset = centre_of_mass(as_uploaded(digits, UploadStyle(280, True))) - centre_of_mass(digits.astype(np.float64))
    assert offset.mean(axis=0) == pytest.approx([-0.5, -0.5], abs=0.1)
