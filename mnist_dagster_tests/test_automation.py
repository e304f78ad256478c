"""New data -> retraining, judged by Dagster's own evaluators on the real definitions.

`dg.evaluate_automation_conditions` runs the conditions of the code location's assets against a test
instance, one call per daemon tick (the first call only records a baseline; each call gets the
cursor of the one before). `raw_mnist_data` and `processed_mnist_data` are materialized for real on
generated data, so their data versions and blocking checks are the real ones; the model assets are
stood in for by runless materializations with a data version, to spare the training.
"""

import io

import dagster as dg
import numpy as np
import pytest

from mnist_dagster.assets.automation import RETRAIN_ON_NEW_DATA
from mnist_dagster.layout import LANDING_PREFIX
from mnist_dagster.definitions import build_defs
from mnist_dagster.resources import prod_resources
from mnist_dagster.sensors.data_arrival import new_labelled_data_sensor
from mnist_dagster.storage import LocalStore
from mnist_dagster_tests.s3_server import s3_client
from mnist_dagster_tests.support import generated_digits, pipeline_assets_and_checks

RAW, PROCESSED = "raw_mnist_data", "processed_mnist_data"
# The assets that follow new data: train, evaluate, deploy past the gate, republish to the endpoint.
MODEL_CHAIN = {"digit_classifier", "model_evaluation", "production_digit_classifier", "digit_predictions"}
RETRAINED = {PROCESSED, *MODEL_CHAIN}


class Ticks:
    """Successive automation ticks over one code location and instance, the cursor carried along."""

    def __init__(self, defs: dg.Definitions, instance: dg.DagsterInstance) -> None:
        self.defs, self.instance, self.cursor = defs, instance, None
        self.keys = [key for key in defs.resolve_asset_graph().get_all_asset_keys()]

    def __call__(self) -> set[str]:
        """The assets requested on this tick."""
        result = dg.evaluate_automation_conditions(defs=self.defs, instance=self.instance, cursor=self.cursor)
        self.cursor = result.cursor
        return {key.to_user_string() for key in self.keys if result.get_num_requested(key)}


def npz(images: np.ndarray, labels: np.ndarray | None) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, images=images, **({} if labels is None else {"labels": labels}))
    return buffer.getvalue()


def labelled_batch(count: int, seed: int) -> bytes:
    return npz(*generated_digits(count, seed))


def report_model_stand_ins(instance: dg.DagsterInstance, version: str = "v1") -> None:
    """The model assets as already materialized, without training them."""
    for key in sorted(MODEL_CHAIN):
        instance.report_runless_asset_event(dg.AssetMaterialization(key, tags={"dagster/data_version": version}))


def materialize(selection: list[str], resources: dict, instance, raise_on_error: bool = True):
    """A run of the real assets (and their checks) in `selection`, as a job launched by hand would be."""
    assets, checks = pipeline_assets_and_checks()
    return dg.materialize(
        [*assets, *checks], selection=selection, resources=resources, instance=instance, raise_on_error=raise_on_error
    )


def data_version(result: dg.ExecuteInProcessResult, key: str) -> str:
    return result.asset_materializations_for_node(key)[0].tags["dagster/data_version"]


def sensor_tick(storage, instance, cursor: str | None) -> dg.SensorResult:
    with dg.build_sensor_context(instance=instance, resources={"storage": storage}, cursor=cursor) as context:
        return new_labelled_data_sensor(context)


@pytest.fixture
def pipeline_state(dev_env, dev_test_resources, instance):
    """Data materialized for real, models stood in for, and a first (baseline) automation tick."""
    assert materialize([RAW, PROCESSED], dev_test_resources, instance).success
    report_model_stand_ins(instance)
    ticks = Ticks(build_defs("dev", dev_env), instance)
    assert ticks() == set()
    return ticks


def test_retraining_assets_use_the_new_data_condition(dev_env):
    graph = build_defs("dev", dev_env).resolve_asset_graph()
    conditions = {key.to_user_string(): graph.get(key).automation_condition for key in graph.get_all_asset_keys()}
    assert {name for name, condition in conditions.items() if condition == RETRAIN_ON_NEW_DATA} == RETRAINED - {
        "digit_predictions"  # the same condition, ignoring raw_mnist_data (it only reads its test images)
    }
    assert conditions["digit_predictions"] == RETRAIN_ON_NEW_DATA.ignore(dg.AssetSelection.assets(RAW))
    assert conditions[RAW] is None  # started by new_labelled_data_sensor, not by automation


def test_new_data_retrains_and_unchanged_data_does_not(pipeline_state, dev_env, dev_test_resources, instance):
    ticks, storage = pipeline_state, dev_test_resources["storage"]
    first = materialize([RAW], dev_test_resources, instance)
    again = materialize([RAW], dev_test_resources, instance)  # same files: a new materialization, same data
    assert data_version(first, RAW) == data_version(again, RAW)
    assert ticks() == set()

    sensor_cursor = sensor_tick(storage, instance, None).cursor  # the landing area is empty
    LocalStore(dev_env["MNIST_DATA_DIR"]).write_bytes(f"{LANDING_PREFIX}/batch-001.npz", labelled_batch(200, seed=7))
    sensor = sensor_tick(storage, instance, sensor_cursor)
    [request] = sensor.run_requests
    landed = materialize([key.to_user_string() for key in request.asset_selection], dev_test_resources, instance)
    assert data_version(landed, RAW) != data_version(again, RAW)

    assert ticks() == RETRAINED  # the whole chain, in one tick
    assert ticks() == set()  # requested once, not again on the next tick


def test_a_failed_blocking_check_stops_retraining(pipeline_state, dev_env, dev_test_resources, instance):
    ticks = pipeline_state
    store = LocalStore(dev_env["MNIST_DATA_DIR"])
    images, _ = generated_digits(3000, seed=8)
    store.write_bytes(f"{LANDING_PREFIX}/only-zeros.npz", npz(images, np.zeros(len(images), np.uint8)))

    run = materialize([RAW, PROCESSED], dev_test_resources, instance, raise_on_error=False)
    balance = {check.check_name: check.passed for check in run.get_asset_check_evaluations()}
    assert balance["class_balance"] is False and not run.success  # a blocking check failed the run
    assert ticks() == set()  # processed data changed, but nothing downstream may train on it
    assert ticks() == set()


def test_a_passing_check_lets_the_same_kind_of_update_retrain(pipeline_state, dev_env, dev_test_resources, instance):
    """The control for the test above: the same manual data run, balanced data, and the models follow."""
    ticks = pipeline_state
    LocalStore(dev_env["MNIST_DATA_DIR"]).write_bytes(f"{LANDING_PREFIX}/balanced.npz", labelled_batch(300, seed=9))

    run = materialize([RAW, PROCESSED], dev_test_resources, instance)
    assert all(check.passed for check in run.get_asset_check_evaluations())
    assert ticks() == MODEL_CHAIN


def test_plain_eager_would_retrain_on_unchanged_data(dev_env, instance):
    """Why RETRAIN_ON_NEW_DATA swaps `newly_updated` for `data_version_changed`: the same history
    (raw re-materialized with its old data version) makes plain eager() request the whole chain."""
    defs = build_defs("dev", dev_env)
    eager_defs = dg.Definitions(
        assets=[
            asset.map_asset_specs(
                lambda spec: spec.replace_attributes(automation_condition=dg.AutomationCondition.eager())
                if spec.automation_condition is not None
                else spec
            )
            for asset in defs.assets
            if isinstance(asset, dg.AssetsDefinition)  # the sweep's external leaderboard has no condition
        ],
        resources=defs.resources,
    )
    ours, eager = Ticks(defs, instance), Ticks(eager_defs, instance)
    for key in [RAW, PROCESSED]:
        instance.report_runless_asset_event(dg.AssetMaterialization(key, tags={"dagster/data_version": "v1"}))
    report_model_stand_ins(instance)
    assert ours() == eager() == set()

    instance.report_runless_asset_event(dg.AssetMaterialization(RAW, tags={"dagster/data_version": "v1"}))
    assert ours() == set()
    assert eager() == RETRAINED

    instance.report_runless_asset_event(dg.AssetMaterialization(RAW, tags={"dagster/data_version": "v2"}))
    assert ours() == RETRAINED


# ----- the landing-area sensor ---------------------------------------------------------------


def test_landing_sensor_requests_raw_data_once_per_change(dev_env, dev_test_resources, instance, capfd):
    storage, store = dev_test_resources["storage"], LocalStore(dev_env["MNIST_DATA_DIR"])
    empty = sensor_tick(storage, instance, None)
    assert not empty.run_requests and "Nothing new" in empty.skip_reason.skip_message

    store.write_bytes(f"{LANDING_PREFIX}/a.npz", labelled_batch(50, seed=1))
    store.write_bytes(f"{LANDING_PREFIX}/notes.txt", b"not a batch: ignored, as raw_mnist_data ignores it")
    added = sensor_tick(storage, instance, empty.cursor)
    [request] = added.run_requests
    assert [key.to_user_string() for key in request.asset_selection] == [RAW]
    assert sensor_tick(storage, instance, empty.cursor).run_requests[0].run_key == request.run_key  # deterministic
    assert "notes.txt" not in request.run_key

    quiet = sensor_tick(storage, instance, added.cursor)
    assert not quiet.run_requests and quiet.cursor == added.cursor  # no double counting

    store.write_bytes(f"{LANDING_PREFIX}/garbage.npz", b"\x00 definitely not a zip archive")
    store.write_bytes(f"{LANDING_PREFIX}/no-labels.npz", npz(generated_digits(5, seed=2)[0], None))
    capfd.readouterr()
    rejected = sensor_tick(storage, instance, quiet.cursor)
    assert not rejected.run_requests
    assert "garbage.npz" in rejected.skip_reason.skip_message and "no-labels.npz" in rejected.skip_reason.skip_message
    warnings = capfd.readouterr().err
    assert "Skipping landed file landing/garbage.npz: not a readable .npz file" in warnings
    assert "Skipping landed file landing/no-labels.npz: missing array: labels" in warnings
    still = sensor_tick(storage, instance, rejected.cursor)  # reported once, then remembered
    assert not still.run_requests and "Skipping" not in capfd.readouterr().err

    store.write_bytes(f"{LANDING_PREFIX}/no-labels.npz", labelled_batch(5, seed=2))  # fixed by its sender
    store.write_bytes(f"{LANDING_PREFIX}/a.npz", labelled_batch(60, seed=3))  # replaced with new content
    changed = sensor_tick(storage, instance, still.cursor)
    [change] = changed.run_requests
    assert change.run_key != request.run_key
    assert "a.npz" in change.run_key and "no-labels.npz" in change.run_key and "garbage" not in change.run_key

    store.delete(f"{LANDING_PREFIX}/a.npz")  # a removed batch changes the training data too
    removed = sensor_tick(storage, instance, changed.cursor)
    assert len(removed.run_requests) == 1 and "-landing/a.npz" in removed.run_requests[0].run_key
    store.delete(f"{LANDING_PREFIX}/garbage.npz")  # a rejected file going away changes nothing
    assert not sensor_tick(storage, instance, removed.cursor).run_requests


def test_landing_sensor_on_s3_sees_new_content_not_reuploads(prod_env, instance):
    storage = prod_resources(prod_env)["storage"]
    s3, bucket, prefix = s3_client(prod_env["AWS_ENDPOINT_URL"]), prod_env["S3_BUCKET"], prod_env["S3_PREFIX"]
    key = f"{prefix}/{LANDING_PREFIX}/from-labelling-team.npz"
    start = sensor_tick(storage, instance, None)
    assert not start.run_requests

    batch = labelled_batch(40, seed=4)
    s3.put_object(Bucket=bucket, Key=key, Body=batch)
    first = sensor_tick(storage, instance, start.cursor)
    assert len(first.run_requests) == 1

    s3.put_object(Bucket=bucket, Key=key, Body=batch)  # the same bytes again: same ETag, same data
    assert not sensor_tick(storage, instance, first.cursor).run_requests

    s3.put_object(Bucket=bucket, Key=key, Body=labelled_batch(40, seed=5))
    changed = sensor_tick(storage, instance, first.cursor)
    assert len(changed.run_requests) == 1

    s3.delete_object(Bucket=bucket, Key=key)
    removed = sensor_tick(storage, instance, changed.cursor)
    s3.put_object(Bucket=bucket, Key=key, Body=labelled_batch(40, seed=5))  # the same object, landed again
    relanded = sensor_tick(storage, instance, removed.cursor)
    assert len(removed.run_requests) == len(relanded.run_requests) == 1
    assert relanded.run_requests[0].run_key != changed.run_requests[0].run_key  # else Dagster would skip it
