"""Fixtures of trained models and real test digits for the inference tests (a plugin: `conftest.py` lists it).

The models come from `serving_support.py`, cached per process, so these session fixtures and the tests
that call `generated_model()` directly share one training each; the real-data model is shared by the run's
workers through the folder `shared_folder_of_the_run` names.
"""

import numpy as np
import pytest

from mnist_dagster.scoring.bundle import Bundle
from mnist_dagster_tests import serving_support
from mnist_dagster_tests.serving_support import generated_model, real_model, real_test_set


@pytest.fixture(scope="session", autouse=True)
def shared_folder_of_the_run(tmp_path_factory, worker_id: str) -> None:
    """Under xdist, the parent of the workers' temp folders is the run's own: models trained there are shared.

    pytest removes it with the run's other temp folders (it keeps the last three runs)."""
    if worker_id != "master":
        serving_support.SHARED_FOLDER = tmp_path_factory.getbasetemp().parent


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
