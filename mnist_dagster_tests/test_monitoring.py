"""`prediction_drift` on generated traffic written by the real prediction-log writer into a real local store:
nothing to judge, windows per arm / version / input path each against its own version's reference, alarms
only on an estimated accuracy drop (input changes alone are info), the batch tables, realised accuracy from
feedback beside the estimate, accepting a window as the reference, and Slack once per alarm.

Images: the references are built from generated digits of seed 21 (and 31 for the challenger); the judged
traffic uses other seeds, so a reference and the windows judged against it never share an image."""

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
from mnist_dagster.lifecycle import deploy
from mnist_dagster.ml import drift
from mnist_dagster.sensors.ml_sensors import slack_on_prediction_drift
from mnist_dagster.serving.feedback import FeedbackLog, FeedbackRecord
from mnist_dagster.serving.prediction_log import PredictionLog, PredictionRecord
from mnist_dagster.storage import LocalStore
from mnist_dagster_tests.serving_support import untrained_bundle
from mnist_dagster_tests.support import generated_digits

VERSION, CHALLENGER = "7", "8"


def sure(count: int, seed: int, a: float = 60.0) -> np.ndarray:
    """Confidences piled up near 1 (mean a / (a + 1)), like a good calibrated model's; a smaller `a` is a
    model that has lost its footing."""
    return np.random.default_rng(seed).beta(a, 1, count)


def reference_for(seed: int) -> drift.DriftReference:
    images, labels = generated_digits(4000, seed=seed)
    pixels = drift.path_reference(images / 255, labels, sure(4000, seed + 1), f"generated digits seed {seed}")
    return drift.DriftReference({"pixels": pixels, "upload": pixels})


@pytest.fixture
def store(dev_test_resources) -> LocalStore:
    return dev_test_resources["storage"].open()


@pytest.fixture
def deployed(store) -> drift.DriftReference:
    """Production version 7 (a real bundle, random weights: no prediction is made here) and its reference,
    written where the gate writes it."""
    deploy.make_production(store, untrained_bundle(VERSION, 0.9), "test deployment")
    reference = reference_for(21)
    store.write_bytes(drift_reference_key(VERSION), reference.to_json())
    return reference


def log_traffic(store, images, digits, confidences, version=VERSION, arm="production", input_path="json") -> list[str]:
    """What the endpoint logs, through its own writer: one object per flush. Returns the prediction ids."""
    log, ids = PredictionLog(store), []
    for pixels, digit, confidence in zip(images, digits, confidences):
        ids.append(uuid.uuid4().hex)
        log.record(PredictionRecord(time.time(), ids[-1], arm, version, int(digit), float(confidence), "predict",
                                    pixels.astype(np.float32), input=input_path))  # fmt: skip
    log.flush()
    return ids


def clean_traffic(count: int, seed: int, a: float = 60.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    images, labels = generated_digits(count, seed=seed)
    return images / 255, labels, sure(count, seed=seed, a=a)


def batch_table(store, count: int, seed: int, name: str) -> None:
    """What the nightly batch writes: a Parquet table of digit, confidence and model version."""
    table = pd.DataFrame({"digit": np.arange(count) % 10, "confidence": sure(count, seed),
                          "model_version": [VERSION] * count})  # fmt: skip
    buffer = io.BytesIO()
    table.to_parquet(buffer, index=False)
    store.write_bytes(f"predictions/scored/date=2026-12-01/{name}.parquet", buffer.getvalue())


def run(resources, instance, config: dict | None = None) -> tuple[dict, dg.AssetCheckEvaluation]:
    result = dg.materialize(
        [prediction_drift], resources=resources, instance=instance,
        run_config={"ops": {"prediction_drift": {"config": {"settle_seconds": 0, **(config or {})}}}},
    )  # fmt: skip
    [materialization] = result.asset_materializations_for_node("prediction_drift")
    [check] = result.get_asset_check_evaluations()
    assert check.check_name == DRIFT_CHECK
    return {key: value.value for key, value in materialization.metadata.items()}, check


def windows(metadata: dict) -> dict[str, dict]:
    return {row.data["window"]: row.data for row in metadata["windows"].records}


def test_without_traffic_or_reference_it_succeeds_and_says_why(store, dev_test_resources, instance):
    metadata, check = run(dev_test_resources, instance)
    assert metadata["summary"].startswith("0 new predictions") and check.passed and metadata["traffic"] == 0

    deploy.make_production(store, untrained_bundle(VERSION, 0.9), "deployed before monitoring existed")
    log_traffic(store, *clean_traffic(300, seed=1))
    metadata, check = run(dev_test_resources, instance)
    assert f"no drift reference for version {VERSION}" in metadata["summary"] and check.passed
    assert not metadata["drift_detected"]

    store.write_bytes(drift_reference_key(VERSION), b'{"format": "drift-reference-v1", "confidences": []}')
    log_traffic(store, *clean_traffic(300, seed=2))
    metadata, check = run(dev_test_resources, instance)  # an older format's reference: as good as none
    assert f"no drift reference for version {VERSION}" in metadata["summary"] and check.passed
    log_traffic(store, *clean_traffic(300, seed=5))
    metadata, _ = run(dev_test_resources, instance, {"accept_reference": True})
    assert "accepted as the reference" in metadata["summary"]
    log_traffic(store, *clean_traffic(300, seed=6))
    metadata, check = run(dev_test_resources, instance)  # judged against the accepted window
    assert list(windows(metadata)) == [f"production/v{VERSION}/json"] and check.passed


def test_too_little_traffic_waits_for_the_next_run(store, deployed, dev_test_resources, instance):
    log_traffic(store, *clean_traffic(50, seed=3))
    metadata, check = run(dev_test_resources, instance, {"min_traffic": 200})
    assert metadata["traffic"] == 50 and "min_traffic=200" in metadata["summary"] and check.passed
    assert not store.exists(DRIFT_CURSOR_KEY)  # nothing judged, nothing consumed

    log_traffic(store, *clean_traffic(200, seed=4))
    metadata, _ = run(dev_test_resources, instance, {"min_traffic": 200})
    assert metadata["traffic"] == 250  # the 50 were kept for now


def test_clean_then_less_sure_answers_alarm_by_the_estimated_accuracy_drop(
    store, deployed, dev_test_resources, instance
):
    log_traffic(store, *clean_traffic(1000, seed=5))
    metadata, check = run(dev_test_resources, instance)
    assert metadata["drift_detected"] is False and metadata["severity"] == "none" and check.passed
    rows = {row.data["statistic"]: row.data for row in metadata["statistics"].records}
    assert set(rows) == {"estimated_accuracy", "predicted_class", "confidence", *drift.FEATURES}
    assert "merged bins, expected >= 5" in rows["mean_ink"]["test"]
    assert (rows["estimated_accuracy"]["moderate"], rows["estimated_accuracy"]["severe"]) == (0.01, 0.03)
    assert "why" in metadata["thresholds"] and "Welch" in metadata["thresholds"]["why"]

    log_traffic(store, *clean_traffic(1000, seed=6, a=12.0))  # mean confidence 0.923 against 0.984
    metadata, check = run(dev_test_resources, instance)
    assert metadata["traffic"] == 1000  # only what arrived since the last run
    assert metadata["drift_detected"] is True and metadata["severity"] == "severe"
    assert metadata["moved"][0]["statistic"] == "estimated_accuracy"
    assert not check.passed and check.severity == dg.AssetCheckSeverity.ERROR

    metadata, check = run(dev_test_resources, instance)  # nothing new since: not judged again
    assert metadata["traffic"] == 0 and check.passed


def test_a_small_drop_warns_and_changed_inputs_alone_are_info(store, deployed, dev_test_resources, instance):
    log_traffic(store, *clean_traffic(1000, seed=7, a=30.0))  # mean 0.968: about 1.6 points below 0.984
    metadata, check = run(dev_test_resources, instance)
    assert metadata["severity"] == "moderate" and metadata["drift_detected"] is True
    assert not check.passed and check.severity == dg.AssetCheckSeverity.WARN

    images, labels, confidences = clean_traffic(1000, seed=8)
    log_traffic(store, drift.thicken(images, 3), labels, confidences)  # fat strokes, read as surely as ever
    metadata, check = run(dev_test_resources, instance)
    assert metadata["severity"] == "info" and metadata["drift_detected"] is False and check.passed
    moved = {row["statistic"] for row in metadata["moved"]}
    assert {"mean_ink", "ink_fraction"} <= moved and "estimated_accuracy" not in moved
    assert "mean_ink mean" in metadata["summary"]  # the summary names what changed


def test_each_arm_and_input_path_is_its_own_window_against_its_own_reference(
    store, deployed, dev_test_resources, instance
):
    deploy.make_production(store, untrained_bundle(CHALLENGER, 0.9), "challenger bundle present")
    store.write_bytes(drift_reference_key(CHALLENGER), reference_for(31).to_json())
    log_traffic(store, *clean_traffic(400, seed=9), input_path="json")
    log_traffic(store, *clean_traffic(400, seed=10), input_path="upload")
    log_traffic(store, *clean_traffic(400, seed=11, a=8.0), version=CHALLENGER, arm="challenger")
    batch_table(store, 300, seed=12, name="run-1")

    metadata, check = run(dev_test_resources, instance)
    found = windows(metadata)
    assert set(found) == {f"production/v{VERSION}/json", f"production/v{VERSION}/upload",
                          f"challenger/v{CHALLENGER}/json", f"production/v{VERSION}/batch"}  # fmt: skip
    assert found[f"challenger/v{CHALLENGER}/json"]["severity"] == "severe"  # the challenger's own traffic alarms
    assert {found[name]["severity"] for name in found if name.startswith("production")} == {"none"}
    assert "seed 31" in found[f"challenger/v{CHALLENGER}/json"]["reference"]
    assert metadata["drift_detected"] and metadata["model_version"] == CHALLENGER and not check.passed
    statistics = [row.data for row in metadata["statistics"].records if row.data["window"].endswith("/batch")]
    assert {row["statistic"] for row in statistics} == {"estimated_accuracy", "predicted_class", "confidence"}

    metadata, _ = run(dev_test_resources, instance)
    assert metadata["traffic"] == 0  # the table and the log objects were consumed once


def test_shadow_amendment_lines_in_the_log_are_skipped_not_a_crash(store, deployed, dev_test_resources, instance):
    """In shadow mode the challenger's digits follow as amendment lines (no model_version, no confidence)."""
    images, digits, confidences = clean_traffic(300, seed=13)
    ids = log_traffic(store, images, digits, confidences)
    shadowed = PredictionLog(store)
    records = [PredictionRecord(time.time(), prediction_id, "production", VERSION, int(digit), 0.9, "predict",
                                pixels.astype(np.float32), shadow_digit=int(digit), shadow_version=CHALLENGER)
               for prediction_id, digit, pixels in zip(ids, digits, images)]  # fmt: skip
    assert shadowed.record_shadow(records)
    shadowed.flush()
    metadata, check = run(dev_test_resources, instance)
    assert metadata["traffic"] == 300 and check.passed  # the 300 answers, each once; the amendments skipped
    assert set(windows(metadata)) == {f"production/v{VERSION}/json"}


def test_a_small_window_waits_while_others_are_judged_and_is_judged_once_it_has_enough(
    store, deployed, dev_test_resources, instance
):
    store.write_bytes(drift_reference_key(CHALLENGER), reference_for(31).to_json())
    challenger, production = f"challenger/v{CHALLENGER}/json", f"production/v{VERSION}/json"
    log_traffic(store, *clean_traffic(400, seed=40))
    log_traffic(store, *clean_traffic(120, seed=41, a=8.0), version=CHALLENGER, arm="challenger")  # a tenth-ish
    metadata, check = run(dev_test_resources, instance, {"min_traffic": 200})
    assert set(windows(metadata)) == {production} and check.passed
    assert metadata["not_judged"] == [f"{challenger}: 120 predictions, fewer than min_traffic: kept for the next run"]

    log_traffic(store, *clean_traffic(300, seed=42))
    log_traffic(store, *clean_traffic(120, seed=43, a=8.0), version=CHALLENGER, arm="challenger")
    metadata, check = run(dev_test_resources, instance, {"min_traffic": 200})
    found = windows(metadata)
    assert found[production]["traffic"] == 300  # each prediction judged once
    assert found[challenger]["traffic"] == 240 and found[challenger]["severity"] == "severe" and not check.passed

    metadata, _ = run(dev_test_resources, instance, {"min_traffic": 200})
    assert metadata["traffic"] == 0  # nothing waits any more


def test_a_waiting_batch_window_reads_its_tables_again_and_one_that_waited_too_long_is_let_go(
    store, deployed, dev_test_resources, instance
):
    batch = f"production/v{VERSION}/batch"
    log_traffic(store, *clean_traffic(400, seed=44))
    batch_table(store, 150, seed=45, name="run-1")
    metadata, _ = run(dev_test_resources, instance, {"min_traffic": 200})
    assert batch not in windows(metadata) and metadata["not_judged"][0].startswith(f"{batch}: 150 predictions")

    log_traffic(store, *clean_traffic(300, seed=46))
    batch_table(store, 150, seed=47, name="run-2")
    metadata, _ = run(dev_test_resources, instance, {"min_traffic": 200})
    assert windows(metadata)[batch]["traffic"] == 300 and windows(metadata)[batch]["severity"] == "none"

    log_traffic(store, *clean_traffic(300, seed=48))
    batch_table(store, 50, seed=49, name="run-3")
    run(dev_test_resources, instance, {"min_traffic": 200})  # the 50 wait ...
    log_traffic(store, *clean_traffic(300, seed=50))
    metadata, _ = run(dev_test_resources, instance, {"min_traffic": 200, "max_wait_days": 0})  # ... too long
    assert batch not in windows(metadata) and "let go unjudged" in metadata["not_judged"][0]
    log_traffic(store, *clean_traffic(300, seed=51))
    metadata, _ = run(dev_test_resources, instance, {"min_traffic": 200})
    assert metadata["traffic"] == 300 and metadata["not_judged"] == []


def test_realised_accuracy_from_feedback_stands_beside_the_estimate(store, deployed, dev_test_resources, instance):
    images, labels, confidences = clean_traffic(600, seed=13)
    ids = log_traffic(store, images, labels, confidences)
    feedback = FeedbackLog(store)
    for index, prediction_id in enumerate(ids[:300]):  # 300 labelled, 30 of them say the answer was wrong
        label = int(labels[index]) if index % 10 else (int(labels[index]) + 1) % 10
        feedback.record(FeedbackRecord(time.time(), prediction_id, label, "production", VERSION))
    feedback.flush()
    metadata, _ = run(dev_test_resources, instance)
    row = windows(metadata)[f"production/v{VERSION}/json"]
    assert row["realised_accuracy"].startswith("90.00% [") and row["realised_accuracy"].endswith("of 300")
    assert row["estimated_accuracy"].endswith("of 600")


def test_an_accepted_window_becomes_the_reference(store, deployed, dev_test_resources, instance):
    images, labels, _ = clean_traffic(1000, seed=14)
    log_traffic(store, drift.thicken(images, 3), labels, sure(1000, 14, a=20.0))
    metadata, check = run(dev_test_resources, instance, {"accept_reference": True})
    assert "accepted as the reference" in metadata["summary"] and check.passed
    accepted = drift.DriftReference.from_json(store.read_bytes(drift_reference_key(VERSION)))
    assert "accepted by the operator" in accepted.paths["pixels"].source
    assert accepted.paths["upload"] == deployed.paths["upload"]  # the other path's reference stays

    images, labels, _ = clean_traffic(1000, seed=15)  # the same kind of traffic, other images
    log_traffic(store, drift.thicken(images, 3), labels, sure(1000, 15, a=20.0))
    metadata, check = run(dev_test_resources, instance)
    assert metadata["severity"] == "none" and check.passed


def test_config_defaults_are_the_measured_thresholds():
    assert DriftConfig().thresholds() == drift.DriftThresholds()


def test_daily_schedule_runs_the_drift_check_after_the_nightly_batch(dev_env):
    schedule = prediction_drift_schedule("UTC")
    assert (schedule.cron_schedule, schedule.default_status) == ("30 2 * * *", dg.DefaultScheduleStatus.RUNNING)
    job = build_defs("dev", dev_env).resolve_job_def(schedule.job_name)
    assert job.asset_layer.executable_asset_keys == {dg.AssetKey("prediction_drift")}


def test_slack_hears_each_alarm_once_and_no_info(store, deployed, dev_test_resources, instance, slack_to_stub):
    slack, stub = slack_to_stub

    def tick(cursor: str | None) -> dg.SensorResult:
        context = dg.build_sensor_context(instance=instance, resources={"slack": slack}, cursor=cursor)
        return slack_on_prediction_drift(context)

    cursor = tick(None).cursor
    images, labels, confidences = clean_traffic(1000, seed=16)
    log_traffic(store, drift.erode(images, 2), labels, confidences)
    metadata, _ = run(dev_test_resources, instance)  # inputs changed, answers as sure: info, no news
    assert metadata["severity"] == "info"
    cursor = tick(cursor).cursor
    assert stub.delivered == []

    log_traffic(store, *clean_traffic(1000, seed=17, a=10.0))
    metadata, _ = run(dev_test_resources, instance)
    assert metadata["drift_detected"]
    for _ in range(3):  # once, not at every tick
        cursor = tick(cursor).cursor
    assert len(stub.delivered) == 1
    text = stub.delivered[0]["text"]
    assert "Prediction drift (severe)" in text and f"model version {VERSION}" in text
    assert f"worst in `production/v{VERSION}/json`" in text and f"• `production/v{VERSION}/json` `estimated_accuracy`" in text
    assert "`estimated_accuracy`" in text and "CBPE" in text and "≥ 0.03" in text
