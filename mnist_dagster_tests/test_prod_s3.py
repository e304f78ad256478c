"""Prod resources against a real S3 API (moto's server on 127.0.0.1): the whole pipeline end to end,
the objects it leaves in the bucket, and a production model that predicts exactly as dev's does.

Also: a prod setting that is missing or wrong fails with a message naming the variable to fix.
"""

import io

import dagster as dg
import mlflow
import numpy as np
import pandas as pd
import pytest
import torch

from mnist_dagster.ml.model import load_checkpoint
from mnist_dagster.resources import prod_resources
from mnist_dagster.resources.mlflow import MlflowTracking
from mnist_dagster.resources.mnist_source import MnistSource
from mnist_dagster.resources.storage import StorageResource
from mnist_dagster.layout import DEPLOYMENT_KEY, INBOX_PREFIX, bundle_prefix
from mnist_dagster.lifecycle import deploy
from mnist_dagster.lifecycle.record import read_record
from mnist_dagster.scoring import bundle
from mnist_dagster.storage import S3Store, StorageSettingsError, open_store
from mnist_dagster_tests.s3_server import bucket_keys
from mnist_dagster_tests.support import FAST_RUN_CONFIG, PIPELINE_ASSETS, generated_digits, pipeline_assets_and_checks


def materialize_pipeline(resources: dict, instance) -> dg.ExecuteInProcessResult:
    assets, checks = pipeline_assets_and_checks()
    result = dg.materialize([*assets, *checks], resources=resources, instance=instance, run_config=FAST_RUN_CONFIG)
    assert result.success
    assert {event.asset_key.to_user_string() for event in result.get_asset_materialization_events()} == PIPELINE_ASSETS
    return result


def with_generated_mirror(resources: dict, mirror: str, md5s: dict[str, str]) -> dict:
    """The generated dataset's checksums instead of the canonical MNIST ones (which it cannot match)."""
    return {**resources, "mnist_source": MnistSource(mirrors=mirror, md5s=md5s)}


def production_probabilities(store, pixels: np.ndarray) -> tuple[str, np.ndarray]:
    current = deploy.production_bundle(store)
    assert current is not None
    return current.version, bundle.Predictor(current).predict_proba(pixels)


def inbox_batch(images: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, images=images)
    return buffer.getvalue()


@pytest.mark.slow  # real processes, 10-60 s: left out of the edit loop
def test_prod_pipeline_on_s3_matches_dev(prod_env, fake_mirror, dev_test_resources, instance):
    mirror, md5s = fake_mirror
    images, _ = generated_digits(200, seed=7)
    pixels = images.reshape(-1, 1, 28, 28).astype(np.float32) / 255.0
    store = open_store(f"s3://{prod_env['S3_BUCKET']}/{prod_env['S3_PREFIX']}")
    store.write_bytes(f"{INBOX_PREFIX}/digits.npz", inbox_batch(images))  # for the nightly batch to score
    prod = materialize_pipeline(with_generated_mirror(prod_resources(prod_env), str(mirror), md5s), instance)

    # Every asset value, both bundles and the batch predictions are objects in the bucket.
    bucket, prefix = prod_env["S3_BUCKET"], prod_env["S3_PREFIX"]
    keys = set(bucket_keys(prod_env["AWS_ENDPOINT_URL"], bucket))
    version = prod.asset_materializations_for_node("production_digit_classifier")[0].metadata["model_version"].value
    stored = ("raw_mnist_data", "processed_mnist_data", "digit_classifier", "model_evaluation")
    expected = {f"{prefix}/assets/{name}.pt" for name in stored}
    expected |= {f"{prefix}/{bundle_prefix(version)}/{name}" for name in ("model.onnx", "bundle.json")}
    expected.add(f"{prefix}/{DEPLOYMENT_KEY}")
    assert expected <= keys, sorted(expected - keys)
    stored_at = prod.asset_materializations_for_node("digit_classifier")[0].metadata["stored_at"].value
    assert stored_at == f"s3://{bucket}/{prefix}/assets/digit_classifier.pt"

    # The production bundle, read back the way the serving CLI reads it, predicts what the trained
    # checkpoint (read back through the same S3 path) predicts in plain PyTorch.
    checkpoint = torch.load(io.BytesIO(store.read_bytes("assets/digit_classifier.pt")), weights_only=True)
    prod_version, prod_probabilities = production_probabilities(store, pixels)
    assert prod_version == version
    assert read_record(store).production == version
    model, norm = load_checkpoint(checkpoint)
    with torch.no_grad():
        torch_probabilities = torch.softmax(model((torch.from_numpy(pixels) - norm["mean"]) / norm["std"]), 1).numpy()
    np.testing.assert_allclose(prod_probabilities, torch_probabilities, atol=1e-5)

    # The nightly batch scored the inbox in S3 with that model and wrote its Parquet table there.
    batch = prod.asset_materializations_for_node("batch_digit_predictions")[0].metadata
    table_uri = batch["predictions"].value
    assert table_uri.startswith(f"s3://{bucket}/{prefix}/") and table_uri.removeprefix("s3://" + bucket + "/") in keys
    frame = pd.read_parquet(io.BytesIO(store.read_bytes(table_uri.removeprefix(f"s3://{bucket}/{prefix}/"))))
    assert frame["model_version"].eq(version).all()
    np.testing.assert_array_equal(frame["digit"].to_numpy(), prod_probabilities.argmax(1))

    # MLflow: the run finished, the registry's production alias names the deployed version.
    client = mlflow.MlflowClient(prod_env["MLFLOW_TRACKING_URI"])
    assert str(client.get_model_version_by_alias("mnist-digit-classifier", "production").version) == version
    run_id = prod.asset_materializations_for_node("production_digit_classifier")[0].metadata["mlflow_run_id"].value
    assert client.get_run(run_id).info.status == "FINISHED"

    # Dev, same seed and data, other storage: the same model, so the same predictions.
    dev = materialize_pipeline(dev_test_resources, instance)
    dev_store = dev_test_resources["storage"].open()
    _, dev_probabilities = production_probabilities(dev_store, pixels)
    np.testing.assert_allclose(prod_probabilities, dev_probabilities, atol=1e-5)
    dev_accuracy = dev.asset_materializations_for_node("model_evaluation")[0].metadata["test_accuracy"].value
    prod_accuracy = prod.asset_materializations_for_node("model_evaluation")[0].metadata["test_accuracy"].value
    assert dev_accuracy == prod_accuracy > 0.95


@dg.asset
def storage_and_tracking_probe(storage: StorageResource, mlflow: MlflowTracking) -> dg.MaterializeResult:
    """Touches S3 and MLflow the way the first real step does, without the cost of one."""
    storage.open().write_bytes("probe.txt", b"ok")
    return dg.MaterializeResult(metadata={"experiment_id": mlflow.experiment_id()})


def probe(env: dict[str, str], instance) -> dg.ExecuteInProcessResult:
    resources = prod_resources(env)
    return dg.materialize(
        [storage_and_tracking_probe],
        resources={"storage": resources["storage"], "mlflow": resources["mlflow"]},
        instance=instance,
        raise_on_error=False,
    )


def failure_message(result: dg.ExecuteInProcessResult) -> str:
    assert not result.success
    failures = [event for event in result.all_events if event.is_step_failure]
    return "\n".join(event.event_specific_data.error.to_string() for event in failures)


@pytest.mark.parametrize("variable", ["S3_BUCKET", "MLFLOW_TRACKING_URI"])
def test_missing_prod_variable_is_named_before_any_step_runs(prod_env, instance, monkeypatch, variable):
    monkeypatch.delenv(variable)
    with pytest.raises(dg.DagsterInvalidConfigError, match=f'environment variable "{variable}" which is not set'):
        probe(prod_env, instance)


def test_missing_aws_credentials_are_named(prod_env, instance, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    message = failure_message(probe(prod_env, instance))
    assert "StorageSettingsError" in message
    assert "no AWS credentials" in message and "AWS_ACCESS_KEY_ID" in message


def test_empty_bucket_setting_is_named(prod_env, instance, monkeypatch):
    monkeypatch.setenv("S3_BUCKET", "")  # e.g. an uncommented, unfilled line in .env
    assert "S3_BUCKET is empty" in failure_message(probe(prod_env, instance))


def test_bucket_that_does_not_exist_is_named(prod_env, instance, monkeypatch):
    monkeypatch.setenv("S3_BUCKET", "no-such-bucket-here")
    message = failure_message(probe(prod_env, instance))
    assert "S3_BUCKET='no-such-bucket-here' does not exist" in message


def test_empty_tracking_uri_is_named(prod_env, instance, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", " ")
    message = failure_message(probe(prod_env, instance))
    assert "MLFLOW_TRACKING_URI is empty" in message


def test_unreachable_tracking_server_is_named_without_its_credentials(prod_env, instance, monkeypatch):
    import socket

    with socket.socket() as closed:  # a port that nothing listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://user:s3cret@127.0.0.1:{port}")
    message = failure_message(probe(prod_env, instance))
    assert f"MLflow at http://127.0.0.1:{port} (MLFLOW_TRACKING_URI) failed" in message
    assert "s3cret" not in message.split("The above exception")[0]


def test_s3_store_behaves_like_the_local_store(prod_env):
    store = open_store(f"s3://{prod_env['S3_BUCKET']}/some/prefix")
    assert isinstance(store, S3Store)
    with pytest.raises(FileNotFoundError, match="some/prefix/missing.bin"):
        store.read_bytes("missing.bin")
    assert not store.exists("a/b.bin")
    store.write_bytes("a/b.bin", b"123")
    store.write_bytes("a/c/d.bin", b"4")
    assert store.read_bytes("a/b.bin") == b"123"
    assert [(item.key, item.size) for item in store.list("a")] == [("a/b.bin", 3), ("a/c/d.bin", 1)]
    assert store.list("nothing-here") == []
    store.delete("a/b.bin")
    assert not store.exists("a/b.bin")
    assert store.uri("x.pt") == f"s3://{prod_env['S3_BUCKET']}/some/prefix/x.pt"


def test_open_store_names_a_missing_bucket(prod_env):
    with pytest.raises(StorageSettingsError, match="S3_BUCKET='absent-bucket' does not exist"):
        open_store("s3://absent-bucket/prefix")
