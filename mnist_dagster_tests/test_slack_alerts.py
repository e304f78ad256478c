"""Slack alerts end to end: real failed runs in a test instance, the real sensors, the real slack_sdk
client, and a stand-in for Slack's `chat.postMessage` on 127.0.0.1 (`slack_stub_server.py`)."""

import io
import logging

import dagster as dg
import numpy as np
import pytest

from mnist_dagster.assets.model_assets import production_digit_classifier
from mnist_dagster.definitions import build_defs
from mnist_dagster.resources.slack import SlackAlerts, slack_alerts
from mnist_dagster.sensors.ml_sensors import slack_on_model_not_deployed, slack_on_run_failure
from mnist_dagster.storage import LocalStore
from mnist_dagster_tests.slack_stub_server import SlackStub
from mnist_dagster_tests.support import finishes_within, generated_digits, pipeline_assets_and_checks

TOKEN = "xoxb-test-0000-secret-token"
WEBSERVER = "http://dagster.example:3000"


@dg.asset
def mirror_download():
    raise ConnectionError(
        "mirror unreachable: connection refused\n"
        "while fetching train-images-idx3-ubyte.gz\n"
        "after 3 attempts\n"
        "this fourth line stays out of Slack"
    )


@dg.asset
def healthy_asset() -> int:
    return 1


download_job = dg.define_asset_job("nightly_download_job", selection=[mirror_download])
FAILING = dg.Definitions(assets=[mirror_download, healthy_asset], jobs=[download_job])


@pytest.fixture
def slack_stub():
    stub = SlackStub(token=TOKEN).start()
    yield stub
    stub.stop()


@pytest.fixture
def slack(slack_stub, monkeypatch) -> SlackAlerts:
    """The resource exactly as the code location builds it: token through `dg.EnvVar`."""
    monkeypatch.setenv("SLACK_BOT_TOKEN", TOKEN)
    env = {"SLACK_BOT_TOKEN": TOKEN, "SLACK_API_URL": slack_stub.api_url, "SLACK_CHANNEL": "#ml-test"}
    return slack_alerts({**env, "DAGSTER_WEBSERVER_URL": WEBSERVER})


@pytest.fixture
def logs(caplog, capfd):
    """Everything logged so far at DEBUG and up: Python loggers (slack_sdk's request log) plus the
    console, where a sensor's `context.log` writes outside the daemon."""
    with caplog.at_level(logging.DEBUG):
        yield lambda: caplog.text + capfd.readouterr().err


def tick(sensor, instance, slack: SlackAlerts, cursor: str | None) -> dg.SensorResult:
    """One sensor evaluation, as the daemon does it: resources bound, cursor from the last tick."""
    context = dg.build_sensor_context(instance=instance, resources={"slack": slack}, cursor=cursor)
    result = sensor(context)
    assert isinstance(result, dg.SensorResult)
    assert not result.run_requests
    return result


def fail_job_run(instance) -> dg.ExecuteInProcessResult:
    result = FAILING.resolve_job_def("nightly_download_job").execute_in_process(instance=instance, raise_on_error=False)
    assert not result.success
    return result


def test_failed_runs_post_one_message_each_with_job_steps_error_and_link(instance, slack, slack_stub):
    cursor = tick(slack_on_run_failure, instance, slack, None).cursor  # first tick: watch from now on
    assert slack_stub.requests == []

    job_run = fail_job_run(instance)
    asset_run = dg.materialize([mirror_download], instance=instance, raise_on_error=False)  # an ad-hoc/automation-style run
    assert not asset_run.success
    assert dg.materialize([healthy_asset], instance=instance).success  # not a failure: no message

    result = tick(slack_on_run_failure, instance, slack, cursor)
    assert [message["channel"] for message in slack_stub.delivered] == ["#ml-test", "#ml-test"]
    job_text, asset_text = (message["text"] for message in slack_stub.delivered)

    assert "job `nightly_download_job`" in job_text
    assert "step `mirror_download` failed" in job_text
    assert "ConnectionError: mirror unreachable: connection refused" in job_text
    assert "while fetching train-images-idx3-ubyte.gz" in job_text and "after 3 attempts" in job_text
    assert "fourth line" not in job_text
    assert "Error occurred while executing" not in job_text  # dagster's wrapper is unwrapped
    assert f"<{WEBSERVER}/runs/{job_run.run_id}|" in job_text

    assert "assets mirror_download" in asset_text and "__" not in asset_text.split("\n")[0]
    assert f"{WEBSERVER}/runs/{asset_run.run_id}" in asset_text
    assert all(request["authorization"] == f"Bearer {TOKEN}" for request in slack_stub.requests)

    again = tick(slack_on_run_failure, instance, slack, result.cursor)
    assert len(slack_stub.delivered) == 2  # exactly once per failed run
    assert again.cursor == result.cursor


@pytest.mark.parametrize("outage", ["error_500", "slow"])
def test_slack_outage_neither_crashes_the_sensor_nor_loses_the_alert(instance, slack, slack_stub, outage):
    slack = slack.model_copy(update={"timeout_seconds": 1})  # the slow stub answers after 3 s
    cursor = tick(slack_on_run_failure, instance, slack, None).cursor
    run = fail_job_run(instance)

    slack_stub.mode = outage
    # A tick must not hang on Slack: a 1 s timeout, one retry; 60 s means it hangs.
    down = finishes_within(lambda: tick(slack_on_run_failure, instance, slack, cursor), 60, "a tick during a Slack outage")
    assert slack_stub.requests, "the sensor did try to post"
    assert slack_stub.delivered == []
    assert "Slack post failed" in down.skip_reason.skip_message
    assert down.cursor == cursor  # the failure is still ahead of the cursor

    slack_stub.mode = "ok"
    back = tick(slack_on_run_failure, instance, slack, down.cursor)
    assert len(slack_stub.delivered) == 1
    assert run.run_id in slack_stub.delivered[0]["text"]
    tick(slack_on_run_failure, instance, slack, back.cursor)
    assert len(slack_stub.delivered) == 1


def test_without_a_token_the_location_loads_and_the_sensor_says_slack_is_off(instance, dev_env, slack_stub, monkeypatch, logs):
    monkeypatch.delenv("SLACK_BOT_TOKEN", raising=False)
    defs = build_defs("dev", {**dev_env, "SLACK_API_URL": slack_stub.api_url})
    slack = defs.resources["slack"]
    assert isinstance(slack, SlackAlerts) and not slack.configured
    assert {"slack_on_run_failure", "slack_on_model_not_deployed"} <= {sensor.name for sensor in defs.sensors}

    cursor = tick(slack_on_run_failure, instance, slack, None).cursor
    fail_job_run(instance)
    result = tick(slack_on_run_failure, instance, slack, cursor)
    assert "Slack is not configured" in result.skip_reason.skip_message
    assert "Slack is not configured" in logs()
    assert slack_stub.requests == []  # nothing was even attempted


def test_token_reaches_the_resource_only_by_variable_name_and_never_the_logs(instance, slack, slack_stub, logs):
    from dagster._core.remote_representation.external_data import RepositorySnap, ResourceConfigEnvVarSnap

    defs = dg.Definitions(sensors=[slack_on_run_failure], resources={"slack": slack})
    snap = RepositorySnap.from_def(defs.get_repository_def())  # what the UI is shown
    shown = next(resource for resource in snap.resources if resource.name == "slack").configured_values
    assert shown["token"] == ResourceConfigEnvVarSnap(name="SLACK_BOT_TOKEN")
    assert TOKEN not in repr(snap)

    cursor = tick(slack_on_run_failure, instance, slack, None).cursor
    fail_job_run(instance)
    slack_stub.mode = "error_500"
    tick(slack_on_run_failure, instance, slack, cursor)  # the failure path logs the error it got
    slack_stub.mode = "ok"
    result = tick(slack_on_run_failure, instance, slack, cursor)
    assert len(slack_stub.delivered) == 1
    logged = logs()
    assert "chat.postMessage" in logged  # slack_sdk's DEBUG request log was captured ...
    assert "Could not post to Slack" in logged  # ... and so was the sensor's own warning ...
    assert TOKEN not in logged  # ... and neither contains the token
    assert TOKEN not in result.skip_reason.skip_message and TOKEN not in slack_stub.delivered[0]["text"]


class MirrorDown(RuntimeError):
    pass


@dg.asset(retry_policy=dg.RetryPolicy(max_retries=1))
def retried_download():
    raise MirrorDown("503 from every mirror")


def test_a_retried_step_reports_its_own_error_not_the_retry_bookkeeping(instance, slack, slack_stub):
    cursor = tick(slack_on_run_failure, instance, slack, None).cursor
    assert not dg.materialize([retried_download], instance=instance, raise_on_error=False).success
    tick(slack_on_run_failure, instance, slack, cursor)
    [message] = slack_stub.delivered
    assert "```MirrorDown: 503 from every mirror```" in message["text"]  # class name without its module path
    assert "max_retries" not in message["text"]


def test_a_failed_blocking_check_is_reported_by_name(instance, slack, slack_stub, dev_env, dev_test_resources):
    """A real pipeline failure: landed data that unbalances the classes fails `class_balance`."""
    images, _ = generated_digits(3000, seed=8)
    buffer = io.BytesIO()
    np.savez(buffer, images=images, labels=np.zeros(len(images), np.uint8))
    LocalStore(dev_env["MNIST_DATA_DIR"]).write_bytes("landing/only-zeros.npz", buffer.getvalue())

    cursor = tick(slack_on_run_failure, instance, slack, None).cursor
    assets, checks = pipeline_assets_and_checks()
    run = dg.materialize(
        [*assets, *checks],
        selection=["raw_mnist_data", "processed_mnist_data"],
        resources=dev_test_resources,
        instance=instance,
        raise_on_error=False,
    )
    assert not run.success
    tick(slack_on_run_failure, instance, slack, cursor)
    [message] = slack_stub.delivered
    assert "assets processed_mnist_data, raw_mnist_data" in message["text"]
    assert "step `processed_mnist_data` failed" in message["text"]
    assert "blocking asset check failed" in message["text"] and "processed_mnist_data: class_balance" in message["text"]


# ----- the deployment gate ------------------------------------------------------------------


@dg.asset(name="digit_classifier")
def candidate_stand_in() -> dict:
    """Stands in for training: the gate only reads the run id from the candidate."""
    return {"mlflow_run_id": "stand-in-run"}


@dg.asset(name="model_evaluation")
def weak_evaluation_stand_in() -> dict:
    return {"test_accuracy": 0.42}


def test_model_kept_out_by_the_gate_is_reported_once(instance, slack, slack_stub, dev_test_resources):
    cursor = tick(slack_on_model_not_deployed, instance, slack, None).cursor
    instance.report_runless_asset_event(  # a deployment is no news
        dg.AssetMaterialization("production_digit_classifier", metadata={"deployed": True, "model_version": "1"})
    )
    gate = dg.materialize(  # the real gate asset, on a weak candidate
        [candidate_stand_in, weak_evaluation_stand_in, production_digit_classifier],
        resources=dev_test_resources,
        instance=instance,
    )
    verdict = gate.asset_materializations_for_node("production_digit_classifier")[0].metadata
    assert verdict["deployed"].value is False

    result = tick(slack_on_model_not_deployed, instance, slack, cursor)
    assert len(slack_stub.delivered) == 1
    text = slack_stub.delivered[0]["text"]
    assert "New model not deployed" in text
    assert verdict["reason"].value in text  # "test accuracy 0.4200 is not above the threshold 0.95"
    assert "Test accuracy 0.4200, threshold 0.95" in text
    assert f"model version {verdict['model_version'].value}" in text
    assert f"{WEBSERVER}/runs/{gate.run_id}" in text

    for _ in range(2):  # once, not at every tick
        result = tick(slack_on_model_not_deployed, instance, slack, result.cursor)
    assert len(slack_stub.delivered) == 1


@dg.asset(name="model_evaluation")
def worse_than_production_stand_in() -> dict:
    """Above the threshold, but on the same test images production alone was right 30 times, the candidate 10."""
    comparison = {
        "production_version": "1", "production_test_accuracy": 0.99, "candidate_test_accuracy": 0.97,
        "candidate_right_production_wrong": 10, "production_right_candidate_wrong": 30, "mcnemar_p_value": 0.0022,
    }  # fmt: skip
    return {"test_accuracy": 0.97, "comparison": comparison}


def test_a_refusal_by_mcnemar_reads_as_one_sentence_with_its_numbers(instance, slack, slack_stub, dev_env, dev_test_resources):
    from mnist_dagster.lifecycle import deploy
    from mnist_dagster.scoring import bundle

    deploy.make_production(LocalStore(dev_env["MNIST_DATA_DIR"]), bundle.make_bundle("1", b"onnx"), "test")
    cursor = tick(slack_on_model_not_deployed, instance, slack, None).cursor
    dg.materialize(
        [candidate_stand_in, worse_than_production_stand_in, production_digit_classifier],
        resources=dev_test_resources,
        instance=instance,
    )
    tick(slack_on_model_not_deployed, instance, slack, cursor)
    [message] = slack_stub.delivered
    head, numbers = message["text"].splitlines()[:2]
    assert head.startswith(":warning: *New model not deployed*: significantly worse than production version 1")
    assert "McNemar's exact test p = 0.0022 &lt; alpha 0.05." in head and not head.endswith("..")
    assert numbers == "Test accuracy 0.9700, threshold 0.95; production stays at model version 1."
