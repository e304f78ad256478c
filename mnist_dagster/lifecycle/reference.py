"""The drift reference of a model version: what serving saw on held-out digits (no Dagster here).

Built when the model is evaluated, from the LAST `REFERENCE_COUNT` test images (indices 8,000-9,999 of the
10k test set); judged windows in the tests and the drift benchmark are drawn from the first 8,000, so a
reference and the traffic judged against it never share an image. Each path is scored by the ONNX graph the
endpoint serves (calibration included once it is baked in):

- "pixels": the 28x28 digits as they are (the JSON path, and the batch inbox's .npz arrays);
- "upload": the last `UPLOAD_COUNT` of them rendered as PNG uploads of 28-400 px in either polarity
  (`scoring.uploads.typical_styles`) and passed through `prepare_upload`.
"""

from __future__ import annotations

import numpy as np

from mnist_dagster.ml.drift import DriftReference, path_reference
from mnist_dagster.scoring.bundle import Predictor
from mnist_dagster.scoring.uploads import as_uploads, through_upload_recipe, typical_styles

REFERENCE_COUNT = 2000
UPLOAD_COUNT = 1000  # rendering and decoding uploads costs ~2 ms each: half the reference keeps evaluation quick
UPLOAD_SEED = 20_220  # fixed: the same model gets the same reference


def reference_digits(test_digits: np.ndarray) -> np.ndarray:
    """The test images a reference is built from: the last `REFERENCE_COUNT`."""
    return test_digits[-REFERENCE_COUNT:]


def build_serving_reference(predictor: Predictor, test_digits: np.ndarray) -> DriftReference:
    """`test_digits` uint8 (N, 28, 28), the whole test set in order; see the module docstring."""
    digits = reference_digits(test_digits)
    pixels = digits.astype(np.float32) / 255
    tail = digits[-UPLOAD_COUNT:]
    uploads = through_upload_recipe(as_uploads(tail, typical_styles(len(tail), UPLOAD_SEED)))
    total = len(test_digits)
    paths = {}
    for kind, images, how in (
        ("pixels", pixels, f"test images {total - len(pixels)}-{total - 1} as 28x28 pixels"),
        ("upload", uploads, f"test images {total - len(uploads)}-{total - 1} as PNG uploads 28-400 px, both "
         "polarities, through prepare_upload"),
    ):
        probabilities = predictor.predict_proba(images.reshape(-1, 1, 28, 28))
        source = f"{how}, scored by the served ONNX graph"
        paths[kind] = path_reference(images, probabilities.argmax(axis=1), probabilities.max(axis=1), source)
    return DriftReference(paths)
