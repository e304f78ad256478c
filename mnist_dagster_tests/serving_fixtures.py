"""Fixtures of trained models and real test digits for the inference tests (a plugin: `conftest.py` lists it).

The models come from `serving_support.py`, cached per process, so these session fixtures and the tests
that call `generated_model()` directly share one training each.
"""

import numpy as np
import pytest

from mnist_dagster.scoring.bundle import Bundle
from mnist_dagster_tests.serving_support import generated_model, real_model, real_test_set


@pytest.fixture(scope="session")
def generated_bundle() -> Bundle:
    return generated_model()


@pytest.fixture(scope="session")
def real_bundle(real_mnist_dir) -> Bundle:
    return real_model(real_mnist_dir)


@pytest.fixture(scope="session")
def real_digits(real_mnist_dir) -> tuple[np.ndarray, np.ndarray]:
    """The real MNIST test images (uint8 N x 28 x 28) and labels."""
    _, _, images, labels = real_test_set(real_mnist_dir)
    return images, labels
