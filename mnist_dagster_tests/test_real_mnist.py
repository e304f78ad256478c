"""End to end on the real MNIST files, served by a mirror on 127.0.0.1, with the default config."""

import dagster as dg
import mlflow
import pytest

from mnist_dagster.ml.config import TrainingConfig
from mnist_dagster.resources import dev_resources
from mnist_dagster_tests.support import pipeline_assets_and_checks, serve_folder

pytestmark = [pytest.mark.real_data, pytest.mark.slow]


@pytest.fixture
def loopback_mirror(real_mnist_dir):
    """The shared MNIST folder served over HTTP, the way a public mirror serves it."""
    with serve_folder(real_mnist_dir) as url:
        yield url


def test_default_pipeline_on_real_mnist_deploys_a_99_percent_model(loopback_mirror, tmp_path, instance):
    env = {"MNIST_DATA_DIR": str(tmp_path / "data"), "MNIST_MIRRORS": loopback_mirror, "MNIST_DEVICE": "cpu"}
    resources = dev_resources(env)
    assets, checks = pipeline_assets_and_checks()
    result = dg.materialize([*assets, *checks], resources=resources, instance=instance)
    assert result.success

    raw = result.asset_materializations_for_node("raw_mnist_data")[0].metadata
    assert raw["source"].value == loopback_mirror
    assert raw["train_images"].value == 60_000 and raw["test_images"].value == 10_000
    assert all(check.passed for check in result.get_asset_check_evaluations())

    trained = result.asset_materializations_for_node("digit_classifier")[0].metadata
    evaluation = result.asset_materializations_for_node("model_evaluation")[0].metadata
    deployed = result.asset_materializations_for_node("production_digit_classifier")[0].metadata
    assert evaluation["test_images"].value == 10_000
    assert evaluation["test_accuracy"].value >= 0.99  # the README's figure is >= 0.993; keep headroom for noise
    assert trained["epochs"].value == TrainingConfig().epochs and trained["training_seconds"].value > 0
    assert deployed["deployed"].value is True

    run = mlflow.MlflowClient(resources["mlflow"].tracking_uri).get_run(trained["mlflow_run_id"].value)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["test_accuracy"] == pytest.approx(evaluation["test_accuracy"].value)
    artifacts = {item.path for item in mlflow.MlflowClient(resources["mlflow"].tracking_uri).list_artifacts(run.info.run_id)}
    assert {"training_curve.png", "confusion_matrix.png", "checkpoint.pt"} <= artifacts

    # The same files again are the same data: Dagster's data version does not move.
    first_version = _data_version(instance, "raw_mnist_data")
    assert dg.materialize(assets, resources=resources, instance=instance, selection=["raw_mnist_data"]).success
    assert _data_version(instance, "raw_mnist_data") == first_version == raw["data_version"].value


def _data_version(instance: dg.DagsterInstance, key: str) -> str:
    event = instance.get_latest_materialization_event(dg.AssetKey(key))
    return event.asset_materialization.tags["dagster/data_version"]
