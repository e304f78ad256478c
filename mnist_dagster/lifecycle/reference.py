"""The drift reference of a model version: what serving saw on held-out digits (no Dagster here).

Built when the model is evaluated, from every fifth test image (indices 4, 9, 14, ...: 2,000 of the 10k test
set, spread over both of its halves, whose writers differ - a block from one end reads a point worse than the
other); judged windows in the tests and the drift benchmark are drawn from the other 8,000
(`judged_indices`), so a reference and the traffic judged against it never share an image. Each path is scored by the ONNX graph the
endpoint serves (calibration included once it is baked in):

- "pixels": the 28x28 digits as they are (the JSON path, and the batch inbox's .npz arrays);
- "upload": every other one of them (at most `UPLOAD_COUNT`) rendered as PNG uploads of 28-400 px in either polarity
  (`scoring.uploads.typical_styles`) and passed through `prepare_upload`.
"""

from __future__ import annotations

import numpy as np

from mnist_dagster.ml.drift import DriftReference, path_reference
from mnist_dagster.scoring.bundle import Predictor
from mnist_dagster.scoring.uploads import as_uploads, through_upload_recipe, typical_styles

REFERENCE_EVERY = 5  # every fifth test image: 2,000 of 10,000
UPLOAD_COUNT = 1000  # rendering and decoding uploads costs ~2 ms each: half the reference keeps evaluation quick
UPLOAD_SEED = 20_220  # fixed: the same model gets the same reference


def reference_indices(count: int) -> np.ndarray:
    """Which of `count` test images a reference is built from: every `REFERENCE_EVERY`th, from index 4."""
    return np.arange(REFERENCE_EVERY - 1, count, REFERENCE_EVERY)


def judged_indices(count: int) -> np.ndarray:
    """The test images a reference never contains: where tests and benchmarks draw judged windows from."""
    return np.setdiff1d(np.arange(count), reference_indices(count))


def build_serving_reference(predictor: Predictor, test_digits: np.ndarray) -> DriftReference:
    """`test_digits` uint8 (N, 28, 28), the whole test set in order; see the module docstring."""
    digits = test_digits[reference_indices(len(test_digits))]
    pixels = digits.astype(np.float32) / 255
    every_other = digits[::2][:UPLOAD_COUNT]
    uploads = through_upload_recipe(as_uploads(every_other, typical_styles(len(every_other), UPLOAD_SEED)))
    paths = {}
    for kind, images, how in (
        ("pixels", pixels, f"{len(pixels)} test images (every {REFERENCE_EVERY}th from index 4) as 28x28 pixels"),
        ("upload", uploads, (f"{len(uploads)} test images (every {2 * REFERENCE_EVERY}th from index 4) as PNG "
                             "uploads 28-400 px, both polarities, through prepare_upload")),
    ):
        probabilities = predictor.predict_proba(images.reshape(-1, 1, 28, 28))
        source = f"{how}, scored by the served ONNX graph"
        paths[kind] = path_reference(images, probabilities.argmax(axis=1), probabilities.max(axis=1), source)
    return DriftReference(paths)
