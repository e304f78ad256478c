"""The real MNIST files, served by a mirror on 127.0.0.1: what the download step makes of them.

The default pipeline on the real 60k digits (a model of at least 99%, deployed, its MLflow run finished) is
checked where a person runs it, in `test_ui_e2e.py`'s "Materialize all": the suite trains the default config on
real data once, not once per test.
"""

import dagster as dg
import pytest

from mnist_dagster.resources import dev_resources
from mnist_dagster_tests.support import pipeline_assets_and_checks, serve_folder

pytestmark = [pytest.mark.real_data, pytest.mark.slow]


@pytest.fixture
def loopback_mirror(real_mnist_dir):
    """The shared MNIST folder served over HTTP, the way a public mirror serves it."""
    with serve_folder(real_mnist_dir) as url:
        yield url


def test_the_real_files_from_a_mirror_are_verified_parsed_and_keep_their_data_version(loopback_mirror, tmp_path, instance):
    env = {"MNIST_DATA_DIR": str(tmp_path / "data"), "MNIST_MIRRORS": loopback_mirror, "MNIST_DEVICE": "cpu"}
    resources = dev_resources(env)
    assets, checks = pipeline_assets_and_checks()
    data_steps = ["raw_mnist_data", "processed_mnist_data"]
    result = dg.materialize([*assets, *checks], selection=data_steps, resources=resources, instance=instance)
    assert result.success

    raw = result.asset_materializations_for_node("raw_mnist_data")[0].metadata
    assert raw["source"].value == loopback_mirror
    assert raw["train_images"].value == 60_000 and raw["test_images"].value == 10_000
    processed = result.asset_materializations_for_node("processed_mnist_data")[0].metadata
    assert processed["test_size"].value == 10_000
    evaluations = result.get_asset_check_evaluations()
    assert evaluations and all(check.passed for check in evaluations)

    # The same files again are the same data: Dagster's data version does not move.
    first_version = _data_version(instance, "raw_mnist_data")
    assert dg.materialize(assets, resources=resources, instance=instance, selection=["raw_mnist_data"]).success
    assert _data_version(instance, "raw_mnist_data") == first_version == raw["data_version"].value


def _data_version(instance: dg.DagsterInstance, key: str) -> str:
    event = instance.get_latest_materialization_event(dg.AssetKey(key))
    return event.asset_materialization.tags["dagster/data_version"]
