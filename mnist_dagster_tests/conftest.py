"""Fixtures only: the core ones below, and the fixture modules listed in `pytest_plugins`.

Tests use fixtures by naming them as arguments, never by importing them. Plain helpers (generated
data, paths, the fast run config, local servers) are in `support.py` and `serving_support.py`.
"""

import os

#: Each xdist worker gets its share of the cores, set before torch loads (OpenMP reads it then) and inherited by
#: every process a test starts (`dagster dev`, torchrun, the endpoint). Without it two workers each train with two
#: threads on two cores, four threads contending: the UI's Materialize all took 294 s beside the real-MNIST
#: pipeline's 135 s in one run, against 122 s and 54 s when they did not overlap. An explicit setting wins.
if "PYTEST_XDIST_WORKER" in os.environ:
    _WORKERS = int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _WORKERS)))

from pathlib import Path

import dagster as dg
import pytest

from mnist_dagster.ml.data import MNIST_FILES
from mnist_dagster.resources import dev_resources
from mnist_dagster.resources.mnist_source import MnistSource
from mnist_dagster_tests.support import NO_COMPUTE_LOGS, REAL_MNIST_DIR, write_mnist_mirror

pytest_plugins = [
    "mnist_dagster_tests.s3_server",  # s3_endpoint, prod_env
    "mnist_dagster_tests.serving_fixtures",  # generated_bundle, real_bundle, real_digits
    "mnist_dagster_tests.slack_stub_server",  # slack_to_stub
]


@pytest.hookimpl(trylast=True)  # after pytest-randomly has shuffled: its order holds within each group
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Longest first: the modules holding a real-data `slow` test (the UI's "Materialize all", the real-MNIST
    pipeline), then the other modules with a `slow` test, then the rest, each group in the random order.

    xdist hands whole modules (`--dist loadfile`) to the workers in this order (`--no-loadscope-reorder`
    keeps it), so the long single tests start at once instead of being left for the end of the run, where
    one core would wait on them alone.
    """

    def weight(item: pytest.Item) -> int:
        slow = item.get_closest_marker("slow") is not None
        return 2 if slow and item.get_closest_marker("real_data") else int(slow)

    module_weight: dict[str, int] = {}
    for item in items:
        module_weight[item.module.__name__] = max(module_weight.get(item.module.__name__, 0), weight(item))
    items.sort(key=lambda item: -module_weight[item.module.__name__])  # stable: the random order stays


@pytest.fixture(scope="session")
def fake_mirror(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A local directory serving generated MNIST files, and their md5s."""
    folder = tmp_path_factory.mktemp("fake-mirror")
    return folder, write_mnist_mirror(folder)


@pytest.fixture
def dev_env(tmp_path, fake_mirror) -> dict[str, str]:
    """Environment variables for a dev deployment rooted in this test's temp folder."""
    mirror, _ = fake_mirror
    return {
        "DAGSTER_DEPLOYMENT": "dev",
        "MNIST_DATA_DIR": str(tmp_path / "data"),
        "MNIST_MIRRORS": str(mirror),
        "MNIST_DEVICE": "cpu",
    }


@pytest.fixture
def dev_test_resources(dev_env, fake_mirror) -> dict[str, object]:
    """Dev resources on the temp folder, with the generated mirror's checksums."""
    _, md5s = fake_mirror
    resources = dev_resources(dev_env)
    resources["mnist_source"] = MnistSource(mirrors=dev_env["MNIST_MIRRORS"], md5s=md5s)
    return resources


@pytest.fixture
def instance():
    """A throwaway Dagster instance (temporary DAGSTER_HOME), without compute-log capture."""
    with dg.instance_for_test(overrides=NO_COMPUTE_LOGS) as test_instance:
        yield test_instance


@pytest.fixture(scope="session")
def real_mnist_dir() -> Path:
    """The four canonical MNIST files; tests that need them skip, saying why, where they are absent."""
    missing = [name for name in MNIST_FILES if not (REAL_MNIST_DIR / name).is_file()]
    if missing:
        pytest.skip(f"real MNIST files not found in {REAL_MNIST_DIR} (missing {', '.join(missing)}); set MNIST_TEST_DATA")
    return REAL_MNIST_DIR

