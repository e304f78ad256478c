"""Corrections become training data: labelled feedback -> `feedback_to_landing_sensor` -> `feedback_to_landing_job`
-> a batch in `landing/` that `read_labelled_batch` accepts -> the new-data sensor requests `raw_mnist_data`,
which takes the batch in. Real local store, the real log writers, the real sensors and job."""

import io
import time
import uuid

import dagster as dg
import numpy as np
import pytest

from mnist_dagster.assets.data_assets import raw_mnist_data
from mnist_dagster.definitions import build_defs
from mnist_dagster.layout import FEEDBACK_LANDED_KEY, LANDING_PREFIX
from mnist_dagster.ml.data import read_labelled_batch
from mnist_dagster.sensors.data_arrival import new_labelled_data_sensor
from mnist_dagster.sensors.feedback import MIN_FEEDBACK_ENV, feedback_to_landing_sensor, min_feedback
from mnist_dagster.lifecycle.landing import land_feedback
from mnist_dagster.serving.feedback import FeedbackLog, FeedbackRecord, latest_labels
from mnist_dagster.serving.prediction_log import PredictionLog, PredictionRecord
from mnist_dagster_tests.support import generated_digits


@pytest.fixture
def store(dev_test_resources):
    return dev_test_resources["storage"].open()


def log_predictions(store, count: int, seed: int) -> tuple[list[str], np.ndarray, np.ndarray]:
    """`count` predictions through the endpoint's log writer; (ids, uint8 images, true labels)."""
    images, labels = generated_digits(count, seed=seed)
    ids = [uuid.uuid4().hex for _ in range(count)]
    log = PredictionLog(store)
    for prediction_id, image in zip(ids, images):
        pixels = image.astype(np.float32) / 255
        log.record(PredictionRecord(time.time(), prediction_id, "production", "1", 0, 0.5, "predict", pixels))
    log.flush()
    return ids, images, labels


def send_feedback(store, labels: dict[str, int], at: float | None = None) -> None:
    """The labels as five clients send them (fewer than 30 each: too few for the poisoning test to judge)."""
    log = FeedbackLog(store)
    for index, (prediction_id, label) in enumerate(labels.items()):
        client = f"key:client-{index % 5}"
        log.record(FeedbackRecord(at or time.time(), prediction_id, int(label), "production", "1", client))
    log.flush()


def tick(sensor, instance, store_resource, cursor: str | None = None) -> dg.SensorResult:
    context = dg.build_sensor_context(instance=instance, resources={"storage": store_resource}, cursor=cursor)
    return sensor(context)


def landed_batches(store) -> list[str]:
    return [item.key for item in store.list(LANDING_PREFIX) if item.key.endswith(".npz")]


def test_latest_label_wins_and_a_repeat_counts_once():
    lines = [
        {"time": "2026-12-01T10:00:00.000000+00:00", "prediction_id": "a", "label": 1},
        {"time": "2026-12-01T10:05:00.000000+00:00", "prediction_id": "a", "label": 7},
        {"time": "2026-12-01T10:01:00.000000+00:00", "prediction_id": "a", "label": 4},  # older, read later
        {"time": "2026-12-01T10:02:00.000000+00:00", "prediction_id": "b", "label": 2},
        {"time": "2026-12-01T10:02:00.000000+00:00", "prediction_id": "b", "label": 3},  # a tie: read later wins
    ]
    assert latest_labels(lines) == {"a": 7, "b": 3}


def test_min_feedback_comes_from_the_environment():
    assert min_feedback({}) == 100 and min_feedback({MIN_FEEDBACK_ENV: "25"}) == 25
    with pytest.raises(ValueError, match=MIN_FEEDBACK_ENV):
        min_feedback({MIN_FEEDBACK_ENV: "lots"})


def test_feedback_lands_once_and_the_new_data_sensor_asks_for_raw_mnist_data(
    store, dev_env, dev_test_resources, instance, monkeypatch
):
    monkeypatch.delenv(MIN_FEEDBACK_ENV, raising=False)  # the default, 100
    storage = dev_test_resources["storage"]
    ids, images, truth = log_predictions(store, 120, seed=31)
    corrected = ids[0]
    send_feedback(store, {corrected: (truth[0] + 1) % 10})  # a wrong label first ...
    send_feedback(store, {pid: truth[i] for i, pid in enumerate(ids[:99])})  # ... corrected here: 99 labels
    skipped = tick(feedback_to_landing_sensor, instance, storage)
    assert not skipped.run_requests and "99 new label(s)" in skipped.skip_reason.skip_message

    send_feedback(store, {ids[99]: truth[99]})  # the hundredth
    [request] = tick(feedback_to_landing_sensor, instance, storage).run_requests
    assert request.run_key and request.run_config == {"ops": {"land_feedback": {"config": {"min_feedback": 100}}}}
    assert tick(feedback_to_landing_sensor, instance, storage).run_requests[0].run_key == request.run_key  # same set

    landing_sensor_cursor = tick(new_labelled_data_sensor, instance, storage).cursor  # sees nothing yet
    job = build_defs("dev", dev_env).resolve_job_def(request.job_name or "feedback_to_landing_job")
    result = job.execute_in_process(run_config=request.run_config, instance=instance, tags=request.tags)
    assert result.success
    [batch_key] = landed_batches(store)
    batch_images, batch_labels = read_labelled_batch(store.read_bytes(batch_key))
    assert len(batch_labels) == 100
    with np.load(io.BytesIO(store.read_bytes(batch_key))) as npz:
        landed_ids = [str(pid) for pid in npz["prediction_ids"]]
    order = [ids.index(pid) for pid in landed_ids]
    assert np.array_equal(batch_images.numpy(), images[order])  # the images the log kept, exactly
    assert batch_labels.tolist() == truth[order].tolist()  # the corrected label, not the first one

    [retrain] = tick(new_labelled_data_sensor, instance, storage, landing_sensor_cursor).run_requests
    assert retrain.asset_selection == [dg.AssetKey("raw_mnist_data")]
    raw = dg.materialize([raw_mnist_data], resources=dev_test_resources, instance=instance)
    assert raw.asset_materializations_for_node("raw_mnist_data")[0].metadata["landed_images"].value == 100

    # nothing lands twice: the sensor has nothing to ask, a forced run lands nothing, a late correction stays out
    assert not tick(feedback_to_landing_sensor, instance, storage).run_requests
    send_feedback(store, {ids[5]: (truth[5] + 3) % 10})
    again = land_feedback(store, min_feedback=1)
    assert again.key is None and again.pending == 0 and again.late_corrections == 1
    assert landed_batches(store) == [batch_key]


def test_a_lost_ledger_is_rebuilt_from_the_batches_and_unmatched_feedback_is_not_retried(store):
    ids, _, truth = log_predictions(store, 30, seed=32)
    send_feedback(store, {pid: truth[i] for i, pid in enumerate(ids[:20])})
    first = land_feedback(store, min_feedback=20)
    assert first.landed == 20 and first.key is not None
    store.delete(FEEDBACK_LANDED_KEY)  # as if the run died between the batch and the ledger
    send_feedback(store, {pid: truth[i] for i, pid in enumerate(ids[20:], start=20)})
    send_feedback(store, {uuid.uuid4().hex: 4})  # a prediction whose image the log does not hold
    second = land_feedback(store, min_feedback=5)
    assert (second.landed, second.unmatched, second.pending) == (10, 1, 11)
    assert len(landed_batches(store)) == 2
    assert land_feedback(store, min_feedback=1).pending == 0  # the unmatched one is not asked for again
