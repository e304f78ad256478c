"""`prediction_drift` on generated traffic written by the real prediction-log writer into a real local store:
quick and successful with nothing to judge, no drift then drift, the check's severities, only the traffic
since the last run, the batch tables, and the Slack message sent once per detection."""

import io
import time
import uuid

import dagster as dg
import numpy as np
import pandas as pd
import pytest

from mnist_dagster.assets.monitoring_assets import DRIFT_CHECK, DriftConfig, prediction_drift
from mnist_dagster.definitions import build_defs
from mnist_dagster.jobs.ml_jobs import prediction_drift_schedule
from mnist_dagster.layout import DRIFT_CURSOR_KEY, drift_reference_key
from mnist_dagster.ml import drift
from mnist_dagster.sensors.ml_sensors import slack_on_prediction_drift
from mnist_dagster.lifecycle import deploy
from mnist_dagster.serving.prediction_log import PredictionLog, PredictionRecord
from mnist_dagster.storage import LocalStore
from mnist_dagster_tests.serving_support import untrained_bundle
from mnist_dagster_tests.support import generated_digits

VERSION = "7"
NOW = {"ops": {"prediction_drift": {"config": {"settle_seconds": 0}}}}  # judge what was just logged


def sure(count: int, seed: int, a: float = 30.0) -> np.ndarray:
    """Confidences piled up near 1, like a good model's; a small `a` is a model that has lost its footing."""
    return np.random.default_rng(seed).beta(a, 1, count)


@pytest.fixture
def store(dev_test_resources) -> LocalStore:
    return dev_test_resources["storage"].open()


@pytest.fixture
def deployed(store) -> drift.DriftReference:
    """Production version 7 (a real bundle, random weights: no prediction is made here) and its reference,
    written where the gate writes it."""
    deploy.make_production(store, untrained_bundle(VERSION, 0.9), "test deployment")
    images, labels = generated_digits(6000, seed=21)
    reference = drift.build_reference(images / 255, labels, sure(10_000, seed=22))
    store.write_bytes(drift_reference_key(VERSION), reference.to_json())
    return reference


def log_traffic(store, images: np.ndarray, digits: np.ndarray, confidences: np.ndarray, version: str = VERSION) -> None:
    """What the endpoint logs, through its own writer: one object per flush."""
    log = PredictionLog(store)
    for pixels, digit, confidence in zip(images, digits, confidences):
        log.record(PredictionRecord(time.time(), uuid.uuid4().hex, "production", version, int(digit),
                                    float(confidence), "predict", pixels.astype(np.float32)))  # fmt: skip
    log.flush()


def clean_traffic(count: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    images, labels = generated_digits(count, seed=seed)
    return images / 255, labels, sure(count, seed=seed)


def run(resources, instance, config: dict | None = None) -> tuple[dict, dg.AssetCheckEvaluation]:
    result = dg.materialize(
        [prediction_drift], resources=resources, instance=instance,
        run_config={"ops": {"prediction_drift": {"config": {"settle_seconds": 0, **(config or {})}}}},
    )  # fmt: skip
    [materialization] = result.asset_materializations_for_node("prediction_drift")
    [check] = result.get_asset_check_evaluations()
    assert check.check_name == DRIFT_CHECK
    return {key: value.value for key, value in materialization.metadata.items()}, check


# ----- nothing to judge ------------------------------------------------------------------------------


def test_without_production_reference_or_traffic_it_succeeds_quickly_and_says_why(store, dev_test_resources, instance):
    metadata, check = run(dev_test_resources, instance)
    assert "no production model yet" in metadata["summary"] and check.passed and metadata["traffic"] == 0

    deploy.make_production(store, untrained_bundle(VERSION, 0.9), "deployed before monitoring existed")
    metadata, check = run(dev_test_resources, instance)
    assert f"no drift reference for production version {VERSION}" in metadata["summary"] and check.passed

    images, labels = generated_digits(100, seed=1)
    store.write_bytes(drift_reference_key(VERSION), drift.build_reference(images / 255, labels, sure(100, 2)).to_json())
    metadata, check = run(dev_test_resources, instance)
    assert metadata["summary"].startswith("0 new predictions") and check.passed and not metadata["drift_detected"]


def test_too_little_traffic_waits_for_the_next_run(store, deployed, dev_test_resources, instance):
    log_traffic(store, *clean_traffic(50, seed=3))
    metadata, check = run(dev_test_resources, instance, {"min_traffic": 200})
    assert metadata["traffic"] == 50 and "fewer than min_traffic=200" in metadata["summary"] and check.passed
    assert not store.exists(DRIFT_CURSOR_KEY)  # nothing judged, nothing consumed

    log_traffic(store, *clean_traffic(200, seed=4))
    metadata, _ = run(dev_test_resources, instance, {"min_traffic": 200})
    assert metadata["traffic"] == 250 and metadata["traffic_with_images"] == 250  # the 50 were kept for now


# ----- no drift, then drift --------------------------------------------------------------------------


def test_clean_traffic_then_thick_strokes_and_unsure_answers(store, deployed, dev_test_resources, instance):
    log_traffic(store, *clean_traffic(1000, seed=5))
    metadata, check = run(dev_test_resources, instance)
    assert metadata["drift_detected"] is False and metadata["severity"] == "none" and check.passed
    assert metadata["traffic"] == 1000 and metadata["model_version"] == VERSION
    rows = {row.data["statistic"]: row.data for row in metadata["statistics"].records}
    assert set(rows) == {"predicted_class", "confidence", "low_confidence_rate", *drift.FEATURES}
    assert rows["mean_ink"]["test"] == "PSI + chi-square over training deciles"
    assert (rows["confidence"]["moderate"], rows["confidence"]["severe"]) == (0.15, 0.3)
    assert "why" in metadata["thresholds"] and metadata["histograms"].startswith(
        "![reference vs current](data:image/png"
    )

    images, labels, _ = clean_traffic(1000, seed=6)
    log_traffic(store, drift.thicken(images, 3), labels, sure(1000, seed=6, a=1.5))
    metadata, check = run(dev_test_resources, instance)
    assert metadata["traffic"] == 1000  # only what arrived since the last run
    assert metadata["drift_detected"] is True and metadata["severity"] == "severe"
    moved = {row["statistic"] for row in metadata["moved"]}
    assert {"mean_ink", "ink_fraction", "confidence", "low_confidence_rate"} <= moved
    assert not check.passed and check.severity == dg.AssetCheckSeverity.ERROR
    assert "severe drift in 1000 predictions" in check.description

    metadata, check = run(dev_test_resources, instance)  # nothing new since: not judged again
    assert metadata["traffic"] == 0 and check.passed


def test_moderate_drift_warns(store, deployed, dev_test_resources, instance):
    """A quarter of the answers are 1s where training had a tenth: PSI about 0.17, between the class bands."""
    images, _, confidences = clean_traffic(1000, seed=7)
    digits = np.where(np.arange(1000) < 250, 1, np.arange(1000) % 9 + (np.arange(1000) % 9 >= 1))
    log_traffic(store, images, digits, confidences)
    metadata, check = run(dev_test_resources, instance)
    assert metadata["severity"] == "moderate" and [row["statistic"] for row in metadata["moved"]] == ["predicted_class"]
    assert not check.passed and check.severity == dg.AssetCheckSeverity.WARN


def test_batch_tables_count_and_other_versions_do_not(store, deployed, dev_test_resources, instance):
    log_traffic(store, *clean_traffic(300, seed=8))
    log_traffic(store, *clean_traffic(300, seed=9), version="6")  # the previous model's answers
    table = pd.DataFrame({
        "digit": np.r_[np.full(400, 3), np.arange(100) % 10], "confidence": np.r_[sure(400, 10), sure(100, 11)],
        "model_version": [VERSION] * 400 + ["6"] * 100,
    })  # fmt: skip
    buffer = io.BytesIO()
    table.to_parquet(buffer, index=False)
    store.write_bytes("predictions/scored/date=2026-12-01/run-1.parquet", buffer.getvalue())
    metadata, _ = run(dev_test_resources, instance)
    assert (metadata["traffic"], metadata["traffic_endpoint"], metadata["traffic_batch"]) == (700, 300, 400)
    assert metadata["traffic_with_images"] == 300  # the batch tables keep no images
    assert "predicted_class" in {row["statistic"] for row in metadata["moved"]}  # 400 threes out of 700

    metadata, _ = run(dev_test_resources, instance)
    assert metadata["traffic"] == 0  # the table and the log objects were consumed once


def test_thresholds_are_run_config(store, deployed, dev_test_resources, instance):
    images, labels, _ = clean_traffic(1000, seed=12)
    log_traffic(store, drift.thicken(images, 3), labels, sure(1000, seed=12))
    loose = {"feature_psi_moderate": 100.0, "feature_psi_severe": 200.0}
    metadata, check = run(dev_test_resources, instance, loose)
    assert metadata["drift_detected"] is False and check.passed
    assert {row.data["statistic"]: row.data["moderate"] for row in metadata["statistics"].records}["mean_ink"] == 100.0


def test_config_defaults_are_the_measured_thresholds():
    config, thresholds = DriftConfig(), drift.DriftThresholds()
    assert config.thresholds() == thresholds


# ----- schedule and Slack ----------------------------------------------------------------------------


def test_daily_schedule_runs_the_drift_check_after_the_nightly_batch(dev_env):
    schedule = prediction_drift_schedule("UTC")
    assert (schedule.cron_schedule, schedule.default_status) == ("30 2 * * *", dg.DefaultScheduleStatus.RUNNING)
    job = build_defs("dev", dev_env).resolve_job_def(schedule.job_name)
    assert job.asset_layer.executable_asset_keys == {dg.AssetKey("prediction_drift")}


def test_slack_hears_each_detection_once_saying_what_moved(
    store, deployed, dev_test_resources, instance, slack_to_stub
):
    slack, stub = slack_to_stub

    def tick(cursor: str | None) -> dg.SensorResult:
        context = dg.build_sensor_context(instance=instance, resources={"slack": slack}, cursor=cursor)
        return slack_on_prediction_drift(context)

    cursor = tick(None).cursor
    log_traffic(store, *clean_traffic(1000, seed=13))
    run(dev_test_resources, instance)  # no drift: no news
    cursor = tick(cursor).cursor
    assert stub.delivered == []

    images, labels, confidences = clean_traffic(1000, seed=14)
    log_traffic(store, drift.erode(images, 2), labels, confidences)
    metadata, _ = run(dev_test_resources, instance)
    assert metadata["drift_detected"]
    for _ in range(3):  # once, not at every tick
        cursor = tick(cursor).cursor
    assert len(stub.delivered) == 1
    text = stub.delivered[0]["text"]
    assert "Prediction drift (severe)" in text and f"model version {VERSION}" in text and "1000 predictions" in text
    assert "`ink_fraction`" in text and "PSI + chi-square over training deciles" in text
    assert "≥ 0.7" in text  # the threshold it passed
