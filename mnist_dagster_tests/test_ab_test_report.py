"""`ab_test_report` on constructed live traffic: prediction and feedback logs written to a real store folder
by the serving side's own writers, a trial set up with `serving.deploy`, the real asset, a real MLflow store
where a promotion moves the aliases, and its Slack alert (through a stand-in for Slack on 127.0.0.1)."""

import time
import uuid

import dagster as dg
import mlflow
import numpy as np
import pytest
from scipy import stats

from mnist_dagster.assets.prediction_assets import ab_test_report
from mnist_dagster.ml.compare import two_proportion_test
from mnist_dagster.sensors.ml_sensors import slack_on_ab_test_decision
from mnist_dagster.lifecycle import deploy
from mnist_dagster.lifecycle.record import Routing, Strategy, read_record
from mnist_dagster.scoring import bundle
from mnist_dagster.serving.feedback import FeedbackLog, FeedbackRecord
from mnist_dagster.serving.prediction_log import PredictionLog, PredictionRecord
from mnist_dagster.storage import LocalStore

MODEL = "mnist-digit-classifier"
BLANK = np.zeros((28, 28), np.float32)


# ----- a trial and its traffic, in the serving format ---------------------------------------------


@pytest.fixture
def store(dev_env) -> LocalStore:
    return LocalStore(dev_env["MNIST_DATA_DIR"])


def start_trial(store: LocalStore, strategy: str, production: str = "1", challenger: str = "2") -> None:
    """Production `production` and the challenger `challenger` beside it; the bytes are never run here."""
    deploy.make_production(store, bundle.make_bundle(production, f"onnx {production}".encode()), "test")
    candidate = bundle.make_bundle(challenger, f"onnx {challenger}".encode())
    deploy.start_trial(store, candidate, Routing(Strategy(strategy), 0.5))


def request(arm: str, version: str, label: int, digit: int, shadow_digit: int | None = None) -> PredictionRecord:
    """One logged prediction (in shadow mode with the challenger's digit, version "2")."""
    record = PredictionRecord(time.time(), uuid.uuid4().hex, arm, version, digit, 0.9, "predict", BLANK)
    if shadow_digit is not None:
        record.shadow_digit, record.shadow_version = shadow_digit, "2"
    return record


def served(arm: str, version: str, right: int, wrong: int) -> list[PredictionRecord]:
    """`right` correct then `wrong` incorrect answers of one arm: label i % 10 (`labels_of`), wrong = label + 1."""
    return [
        request(arm, version, i % 10, i % 10 if i < right else (i + 1) % 10) for i in range(right + wrong)
    ]


def labels_of(records: list[PredictionRecord]) -> list[int]:
    """The true labels of `served`'s records."""
    return [i % 10 for i in range(len(records))]


def labelled(records: list[PredictionRecord], labels: list[int], at: float | None = None) -> list[FeedbackRecord]:
    return [
        FeedbackRecord(at or time.time(), record.prediction_id, label, record.arm, record.model_version)
        for record, label in zip(records, labels, strict=True)
    ]


def write_logs(store: LocalStore, predictions: list[PredictionRecord], feedback: list[FeedbackRecord]) -> None:
    """Through the serving side's writers, so the lines are exactly what the endpoint logs."""
    for log, records in ((PredictionLog(store), predictions), (FeedbackLog(store), feedback)):
        for record in records:
            log.record(record)
        log.flush()


def arm_traffic(store, arm: str, version: str, right: int, wrong: int, labelled_count: int | None = None):
    """Served and (the first `labelled_count`, default all) labelled predictions of one arm, logged."""
    records = served(arm, version, right, wrong)
    count = len(records) if labelled_count is None else labelled_count
    write_logs(store, records, labelled(records[:count], labels_of(records)[:count]))
    return records


def report(resources, instance, **config) -> dict:
    result = dg.materialize(
        [ab_test_report], resources=resources, instance=instance,
        run_config={"ops": {"ab_test_report": {"config": config}}},
    )  # fmt: skip
    assert result.success
    return metadata_of(result.asset_materializations_for_node("ab_test_report")[0])


def metadata_of(materialization) -> dict:
    return {key: value.value for key, value in materialization.metadata.items()}


# ----- decisions -----------------------------------------------------------------------------------


def test_no_trial_is_a_quick_success_that_says_so(dev_test_resources, instance, store):
    deploy.make_production(store, bundle.make_bundle("1", b"onnx"), "test")
    metadata = report(dev_test_resources, instance)
    assert metadata["decision"] == "no trial" and metadata["promoted"] is False
    assert "nothing to compare" in metadata["status"]


def test_a_trial_without_traffic_or_feedback_needs_more_data_and_says_why(dev_test_resources, instance, store):
    start_trial(store, "ab_test")
    metadata = report(dev_test_resources, instance)
    assert metadata["decision"] == "need_more_data" and metadata["promoted"] is False
    assert metadata["status"] == "no predictions logged since the trial started: nothing to judge yet"
    assert metadata["production_labelled"] == metadata["challenger_labelled"] == 0
    assert metadata["p_value"] == "not computed (too few labels)"

    arm_traffic(store, "production", "1", 190, 10, labelled_count=0)  # traffic, but nobody sent a label
    metadata = report(dev_test_resources, instance)
    assert metadata["status"] == "no feedback sent since the trial started: nothing to judge yet"
    assert metadata["prediction_lines"] == 200 and metadata["feedback_lines"] == 0


def test_below_the_minimum_in_either_arm_it_needs_more_data(dev_test_resources, instance, store):
    start_trial(store, "ab_test")
    arm_traffic(store, "production", "1", 400, 100)
    challenger = arm_traffic(store, "challenger", "2", 199, 0)
    metadata = report(dev_test_resources, instance)
    assert metadata["decision"] == "need_more_data"
    assert metadata["why"] == "challenger has 199 of the 200 labelled predictions needed per arm"
    assert "need_more_data while either arm has fewer than 200 labelled predictions" in metadata["rule"]

    write_logs(store, [], labelled(challenger[:5], labels_of(challenger)[:5]))  # the same labels again: still 199
    assert report(dev_test_resources, instance)["challenger_labelled"] == 199
    assert report(dev_test_resources, instance, min_labelled_per_arm=199)["decision"] == "promote"


def test_ab_test_promotes_a_significantly_better_challenger_by_the_two_proportion_test(
    dev_test_resources, instance, store
):
    start_trial(store, "ab_test")
    arm_traffic(store, "production", "1", 170, 30)  # 85%
    arm_traffic(store, "challenger", "2", 194, 6)  # 97%
    arm_traffic(store, "production", "0", 0, 300)  # an older production's lines: not this trial's
    arm_traffic(store, "challenger", "7", 0, 300)  # an earlier challenger's
    metadata = report(dev_test_resources, instance)

    expected = two_proportion_test(170, 200, 194, 200)
    assert metadata["decision"] == "promote" and metadata["finding"] == "challenger better"
    assert metadata["p_value"] == pytest.approx(expected.p_value) and expected.p_value < 0.001
    assert metadata["test"].startswith("two-sided two-proportion z-test")
    assert (metadata["production_accuracy"], metadata["challenger_accuracy"]) == (0.85, 0.97)
    assert (metadata["production_labelled"], metadata["challenger_labelled"]) == (200, 200)
    assert metadata["why"].startswith("challenger 97.00% (n=200) against production 85.00% (n=200)")
    rows = {row.data["arm"]: row.data for row in metadata["arms"].records}
    assert rows["challenger"]["model_version"] == "2"
    assert rows["challenger"]["ci95_low"] < 0.97 < rows["challenger"]["ci95_high"]  # a 95% Wilson interval
    assert metadata["promoted"] is False  # auto_promote is off by default: the report only says so
    assert read_record(store).strategy == "ab_test" and read_record(store).production == "1"


def test_ab_test_keeps_production_against_a_significantly_worse_challenger(dev_test_resources, instance, store):
    start_trial(store, "ab_test")
    arm_traffic(store, "production", "1", 190, 10)
    arm_traffic(store, "challenger", "2", 160, 40)
    metadata = report(dev_test_resources, instance, auto_promote=True)
    assert metadata["decision"] == "keep" and metadata["finding"] == "challenger significantly worse"
    assert metadata["p_value"] < 0.05 and metadata["promoted"] is False
    assert read_record(store).production == "1" and deploy.current_challenger(store).version == "2"


def test_ab_test_keeps_production_without_a_significant_difference(dev_test_resources, instance, store):
    start_trial(store, "ab_test")
    arm_traffic(store, "production", "1", 180, 20)
    arm_traffic(store, "challenger", "2", 184, 16)
    metadata = report(dev_test_resources, instance)
    assert metadata["decision"] == "keep" and metadata["finding"] == "no significant difference"
    assert metadata["p_value"] > 0.05 and "not below alpha 0.05" in metadata["why"]


def test_the_latest_label_for_a_prediction_is_the_one_believed(dev_test_resources, instance, store):
    start_trial(store, "ab_test")
    production = arm_traffic(store, "production", "1", 200, 0)
    arm_traffic(store, "challenger", "2", 200, 0)
    later = time.time() + 60
    wrong = [(label + 3) % 10 for label in labels_of(production)[:40]]
    write_logs(store, [], labelled(production[:40], wrong, at=later))  # the client corrected 40 labels
    metadata = report(dev_test_resources, instance)
    assert metadata["production_labelled"] == 200 and metadata["production_accuracy"] == 0.8
    assert metadata["feedback_lines"] == 440


def shadowed(production_right: bool, challenger_right: bool, count: int) -> tuple[list[PredictionRecord], list[int]]:
    """`count` requests production answered and the challenger scored in shadow, and their labels."""
    labels = [i % 10 for i in range(count)]
    records = [
        request("production", "1", label, label if production_right else (label + 1) % 10,
                shadow_digit=label if challenger_right else (label + 2) % 10)
        for label in labels
    ]  # fmt: skip
    return records, labels


def test_shadow_uses_mcnemar_on_the_same_requests_and_reports_agreement(dev_test_resources, instance, store):
    start_trial(store, "shadow")
    predictions, labels = [], []
    # (production right, challenger right, requests): 25 right by the challenger alone, 5 by production alone
    for production_right, challenger_right, count in [(1, 1, 265), (0, 1, 25), (1, 0, 5), (0, 0, 5)]:
        records, truth = shadowed(bool(production_right), bool(challenger_right), count)
        predictions, labels = predictions + records, labels + truth
    unlabelled, _ = shadowed(True, True, 100)  # both agree; the agreement rate needs no label
    no_shadow = served("production", "1", 10, 0)  # the challenger's queue was full: labelled, but not paired
    feedback = labelled(predictions + no_shadow, labels + labels_of(no_shadow))
    write_logs(store, predictions + unlabelled + no_shadow, feedback)

    metadata = report(dev_test_resources, instance)
    assert (metadata["production_labelled"], metadata["challenger_labelled"]) == (300, 300)
    assert metadata["production_accuracy"] == pytest.approx(270 / 300, abs=1e-4)
    assert metadata["challenger_accuracy"] == pytest.approx(290 / 300, abs=1e-4)
    assert metadata["test"].startswith("McNemar's exact test")
    assert metadata["p_value"] == pytest.approx(stats.binomtest(25, 30, 0.5).pvalue)  # 25 against 5 discordant
    assert metadata["decision"] == "promote" and metadata["finding"] == "challenger better"
    assert metadata["labelled_without_shadow"] == 10 and metadata["shadowed_requests"] == 400
    # they disagree on the 30 discordant requests, and on the 5 both got wrong (label + 1 against label + 2)
    assert metadata["agreement_rate"] == pytest.approx((400 - 35) / 400)


# ----- promotion --------------------------------------------------------------------------------------


def register_versions(tracking_uri: str, count: int) -> mlflow.MlflowClient:
    """Registry versions 1..count (the report moves aliases only; what they point at is never loaded here)."""
    client = mlflow.MlflowClient(tracking_uri)
    client.create_registered_model(MODEL)
    for _ in range(count):
        client.create_model_version(MODEL, source="/nonexistent/stand-in-model", run_id=None)
    return client


def test_auto_promote_switches_production_the_endpoint_and_the_aliases(dev_test_resources, instance, store):
    client = register_versions(dev_test_resources["mlflow"].tracking_uri, 2)
    start_trial(store, "ab_test")
    client.set_registered_model_alias(MODEL, "production", "1")
    client.set_registered_model_alias(MODEL, "challenger", "2")
    arm_traffic(store, "production", "1", 170, 30)
    arm_traffic(store, "challenger", "2", 194, 6)

    result = dg.materialize(
        [ab_test_report], resources=dev_test_resources, instance=instance,
        run_config={"ops": {"ab_test_report": {"config": {"auto_promote": True}}}},
    )  # fmt: skip
    by_asset = {event.asset_key.to_user_string(): metadata_of(event.materialization)
                for event in result.get_asset_materialization_events()}  # fmt: skip
    assert by_asset["ab_test_report"]["decision"] == "promote" and by_asset["ab_test_report"]["promoted"] is True

    record = read_record(store)  # what the running endpoint follows
    assert record.production == "2" and record.challenger is None and record.routing == Routing()
    assert [entry.version for entry in deploy.production_history(store)] == ["1", "2"]
    assert str(client.get_model_version_by_alias(MODEL, "production").version) == "2"
    assert "challenger" not in client.get_registered_model(MODEL).aliases

    production = by_asset["production_digit_classifier"]  # the promotion in the deployed model's own history
    assert production["decision"] == "promoted" and production["deployed"] is True
    assert (production["model_version"], production["previous_version"]) == ("2", "1")
    assert production["reason"].startswith("promoted after an A/B test (ab_test): challenger 97.00%")


# ----- Slack ------------------------------------------------------------------------------------------


def tick(instance, resource, cursor: str | None) -> str:
    context = dg.build_sensor_context(instance=instance, resources={"slack": resource}, cursor=cursor)
    return slack_on_ab_test_decision(context).cursor


def test_a_decision_is_posted_once_and_again_only_when_it_changes(dev_test_resources, instance, store, slack_to_stub):
    resource, stub = slack_to_stub
    cursor = tick(instance, resource, None)
    start_trial(store, "ab_test")
    report(dev_test_resources, instance)  # need_more_data: no news
    arm_traffic(store, "production", "1", 180, 20)
    arm_traffic(store, "challenger", "2", 184, 16)
    report(dev_test_resources, instance)  # keep
    report(dev_test_resources, instance)  # the same keep the next day
    cursor = tick(instance, resource, cursor)
    cursor = tick(instance, resource, cursor)
    assert [message["text"].splitlines()[0] for message in stub.delivered] == [
        ":scales: *A/B test (ab_test): keep production version 1* (no significant difference)"
    ]
    assert "challenger 92.00% (n=200) against production 90.00% (n=200); two-sided two-proportion z-test p =" in (
        stub.delivered[0]["text"]
    )
    assert "Challenger version 2 stays on trial." in stub.delivered[0]["text"]

    arm_traffic(store, "challenger", "2", 200, 0)  # the challenger pulls ahead
    report(dev_test_resources, instance)
    tick(instance, resource, cursor)
    assert len(stub.delivered) == 2
    text = stub.delivered[1]["text"]
    assert text.startswith(":trophy: *A/B test (ab_test): challenger version 2 beats production version 1*")
    assert "Not promoted (auto_promote is off)" in text and "&lt; alpha 0.05" in text
