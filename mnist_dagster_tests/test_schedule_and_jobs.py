"""The 2 AM schedule, the hand-launched jobs and their retry policies, and the instance settings
(`dagster.yaml`): what runs when, and what a transient failure does."""

import datetime
import shutil
import subprocess
import sys
from pathlib import Path
from zoneinfo import ZoneInfo

import dagster as dg
import pytest
from dagster._core.definitions.dependency import NodeHandle
from dagster._utils.schedules import cron_string_iterator  # the tick times the schedule daemon uses

from mnist_dagster.assets.automation import TRANSIENT_IO_RETRY
from mnist_dagster.definitions import build_defs
from mnist_dagster.jobs.ml_jobs import (
    TIMEZONE_ENV,
    ab_test_report_schedule,
    nightly_batch_schedule,
    schedule_timezone,
)
from mnist_dagster.resources.mnist_source import MnistSource
from mnist_dagster_tests.support import (
    PIPELINE_ASSETS,
    REPO_ROOT,
    QuietHandler,
    pipeline_assets_and_checks,
    serve_folder,
)


def selected(defs: dg.Definitions, job_name: str) -> set[str]:
    return {key.to_user_string() for key in defs.resolve_job_def(job_name).asset_layer.selected_asset_keys}


def load_in_subprocess(env_overrides: dict[str, str], code: str) -> subprocess.CompletedProcess:
    """Load the code location the way `dagster dev` does, in a fresh interpreter with its own env."""
    import os

    env = {**os.environ, **env_overrides}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)


# ----- the schedule ----------------------------------------------------------------------------


def test_timezone_defaults_to_utc():
    assert schedule_timezone({}) == "UTC"
    assert schedule_timezone({TIMEZONE_ENV: "  "}) == "UTC"
    assert schedule_timezone({TIMEZONE_ENV: "Europe/Berlin"}) == "Europe/Berlin"


@pytest.mark.parametrize("timezone", ["UTC", "Europe/Berlin", "America/New_York"])
def test_nightly_schedule_scores_the_inbox_at_2am_local_time(timezone, dev_env):
    schedule = nightly_batch_schedule(timezone)
    assert schedule.default_status == dg.DefaultScheduleStatus.RUNNING
    assert schedule.job_name == "batch_inference_job"
    assert selected(build_defs("dev", dev_env), schedule.job_name) == {"batch_digit_predictions"}

    zone = ZoneInfo(timezone)
    after = datetime.datetime(2026, 6, 10, 14, 30, tzinfo=zone)
    ticks = cron_string_iterator(after.timestamp(), schedule.cron_schedule, schedule.execution_timezone)
    assert [next(ticks) for _ in range(3)] == [datetime.datetime(2026, 6, day, 2, 0, tzinfo=zone) for day in (11, 12, 13)]

    context = dg.build_schedule_context(scheduled_execution_time=datetime.datetime(2026, 6, 11, 2, 0, tzinfo=zone))
    [request] = schedule.evaluate_tick(context).run_requests
    assert request.tags["dagster/schedule_name"] == "nightly_batch_predictions"
    assert request.job_name in (None, "batch_inference_job")  # None: the schedule's own job


def test_the_ab_test_report_runs_daily_at_3am_local_time(dev_env):
    schedule = ab_test_report_schedule("Europe/Berlin")
    assert schedule.default_status == dg.DefaultScheduleStatus.RUNNING
    assert (schedule.name, schedule.job_name) == ("daily_ab_test_report", "ab_test_report_job")
    assert selected(build_defs("dev", dev_env), schedule.job_name) == {"ab_test_report"}
    zone = ZoneInfo("Europe/Berlin")
    after = datetime.datetime(2026, 6, 10, 14, 30, tzinfo=zone).timestamp()
    ticks = cron_string_iterator(after, schedule.cron_schedule, schedule.execution_timezone)
    assert [next(ticks) for _ in range(2)] == [datetime.datetime(2026, 6, day, 3, 0, tzinfo=zone) for day in (11, 12)]


def test_daylight_saving_days_still_run_once():
    """Europe/Berlin has no 02:00 on 29 March 2026 and two on 25 October: one run each day regardless."""
    schedule = nightly_batch_schedule("Europe/Berlin")
    zone = ZoneInfo("Europe/Berlin")
    spring = cron_string_iterator(datetime.datetime(2026, 3, 28, 12, tzinfo=zone).timestamp(), schedule.cron_schedule, "Europe/Berlin")
    assert [next(spring).isoformat() for _ in range(2)] == ["2026-03-29T03:00:00+02:00", "2026-03-30T02:00:00+02:00"]
    autumn = cron_string_iterator(datetime.datetime(2026, 10, 24, 12, tzinfo=zone).timestamp(), schedule.cron_schedule, "Europe/Berlin")
    assert [next(autumn).date().isoformat() for _ in range(2)] == ["2026-10-25", "2026-10-26"]


def test_code_location_takes_the_timezone_from_the_environment():
    result = load_in_subprocess(
        {TIMEZONE_ENV: "America/New_York"},
        "from mnist_dagster.definitions import defs\n"
        "for s in defs.schedules: print(s.name, s.cron_schedule, s.execution_timezone)",
    )
    assert result.returncode == 0, result.stderr
    assert [line.split() for line in result.stdout.splitlines()] == [
        ["nightly_batch_predictions", "0", "2", "*", "*", "*", "America/New_York"],
        ["daily_ab_test_report", "0", "3", "*", "*", "*", "America/New_York"],
        ["daily_prediction_drift", "30", "2", "*", "*", "*", "America/New_York"],
    ]


def test_unknown_timezone_fails_the_load_naming_the_variable():
    result = load_in_subprocess({TIMEZONE_ENV: "Mars/Olympus_Mons"}, "import mnist_dagster.definitions")
    assert result.returncode != 0
    assert f"{TIMEZONE_ENV}='Mars/Olympus_Mons' is not a known time zone" in result.stderr


def test_everything_automatic_is_on_when_the_code_location_loads(dev_env):
    defs = build_defs("dev", dev_env)
    assert {schedule.name: schedule.default_status for schedule in defs.schedules} == {
        "nightly_batch_predictions": dg.DefaultScheduleStatus.RUNNING,
        "daily_ab_test_report": dg.DefaultScheduleStatus.RUNNING,
        "daily_prediction_drift": dg.DefaultScheduleStatus.RUNNING,
    }
    assert {sensor.name: sensor.default_status for sensor in defs.sensors} == {
        "new_labelled_data_sensor": dg.DefaultSensorStatus.RUNNING,
        "automation_sensor": dg.DefaultSensorStatus.RUNNING,
        "slack_on_run_failure": dg.DefaultSensorStatus.RUNNING,
        "slack_on_model_not_deployed": dg.DefaultSensorStatus.RUNNING,
        "slack_on_ab_test_decision": dg.DefaultSensorStatus.RUNNING,
        "slack_on_prediction_drift": dg.DefaultSensorStatus.RUNNING,
        "slack_on_feedback_quarantine": dg.DefaultSensorStatus.RUNNING,
        "feedback_to_landing_sensor": dg.DefaultSensorStatus.RUNNING,
        "close_orphaned_mlflow_runs": dg.DefaultSensorStatus.RUNNING,
        "sweep_winner_sensor": dg.DefaultSensorStatus.RUNNING,
    }


# ----- jobs and retries -------------------------------------------------------------------------


def test_jobs_cover_the_stages_people_launch_by_hand(dev_env):
    defs = build_defs("dev", dev_env)
    assert selected(defs, "full_pipeline_job") == PIPELINE_ASSETS
    assert selected(defs, "training_job") == {"digit_classifier", "model_evaluation", "production_digit_classifier"}
    assert selected(defs, "batch_inference_job") == {"batch_digit_predictions"}
    assert selected(defs, "ab_test_report_job") == {"ab_test_report"}
    assert [node.name for node in defs.resolve_job_def("rollback_job").nodes] == ["roll_back_production"]


def test_retries_only_where_a_second_attempt_can_help(dev_env):
    defs = build_defs("dev", dev_env)

    def policies(job_name: str) -> dict[str, dg.RetryPolicy | None]:
        job = defs.resolve_job_def(job_name)
        return {node.name: job.get_retry_policy_for_handle(NodeHandle(node.name, None)) for node in job.nodes}

    full = policies("full_pipeline_job")
    assert {name for name, policy in full.items() if policy == TRANSIENT_IO_RETRY} == {
        "raw_mnist_data",  # mirror downloads
        "production_digit_classifier",  # MLflow registry and bundle writes
        "batch_digit_predictions",  # inbox reads and Parquet writes (S3 in prod)
        "digit_predictions",  # bundle publishing, the HTTP check
    }
    for never in ("processed_mnist_data", "digit_classifier", "model_evaluation"):
        assert full[never] is None, f"{never} fails the same way twice"
    assert full["ab_test_report"] is None  # a retry after a promotion would find no trial left to judge
    assert policies("rollback_job") == {"roll_back_production": None}  # twice would roll back twice
    assert policies("training_job")["digit_classifier"] is None
    assert policies("batch_inference_job") == {"batch_digit_predictions": TRANSIENT_IO_RETRY}


class FlakyMirror(QuietHandler):
    """Serves a folder, but answers the first request with 503, like a mirror having a bad minute."""

    failures_left = 1

    def send_head(self):
        if type(self).failures_left > 0:
            type(self).failures_left -= 1
            self.send_error(503, "Service Unavailable")
            return None
        return super().send_head()


@pytest.mark.slow  # 5 s or more on two cores (a pipeline, a server, a subprocess): left out of the edit loop
def test_a_transient_download_failure_is_retried(fake_mirror, dev_test_resources, instance, tmp_path):
    folder, md5s = fake_mirror
    served = tmp_path / "mirror"
    shutil.copytree(folder, served)
    FlakyMirror.failures_left = 1
    with serve_folder(served, FlakyMirror) as mirror:
        assets, checks = pipeline_assets_and_checks()
        result = dg.materialize(
            [*assets, *checks],
            selection=["raw_mnist_data"],
            resources={**dev_test_resources, "mnist_source": MnistSource(mirrors=mirror, md5s=md5s)},
            instance=instance,
        )
    assert result.success
    retried = [event for event in result.all_events if event.event_type == dg.DagsterEventType.STEP_UP_FOR_RETRY]
    assert len(retried) == 1 and FlakyMirror.failures_left == 0
    assert result.asset_materializations_for_node("raw_mnist_data")[0].metadata["source"].value == mirror


# ----- instance settings -------------------------------------------------------------------------


def test_dagster_yaml_queues_runs_and_limits_the_training_pool(tmp_path, monkeypatch):
    """Loaded as `dagster dev` loads it: the run queue, two runs at once, one training at a time, and
    the run history under .dagster_home/ of the folder it starts in, still there after a restart."""
    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(REPO_ROOT / "dagster.yaml", home / "dagster.yaml")
    monkeypatch.chdir(tmp_path)
    with dg.DagsterInstance.from_config(str(home)) as instance:
        concurrency = instance.get_concurrency_config()
        assert type(instance.run_coordinator).__name__ == "QueuedRunCoordinator"
        assert concurrency.run_queue_config.max_concurrent_runs == 2
        assert concurrency.pool_config.default_pool_limit == 1
        assert concurrency.pool_config.pool_granularity.value == "run"  # checked when a run leaves the queue
        training = instance.event_log_storage.get_concurrency_info("training")  # digit_classifier's pool
        assert (training.limit, training.using_default_limit) == (1, True)
        run = instance.create_run_for_job(dg.GraphDefinition("noop").to_job())
    assert Path(tmp_path / ".dagster_home" / "storage" / "history" / "runs.db").is_file()
    with dg.DagsterInstance.from_config(str(home)) as reopened:  # a restart
        assert reopened.get_run_by_id(run.run_id) is not None


def test_the_schedule_time_zone_comes_from_the_env_the_definitions_are_built_with(tmp_path):
    from mnist_dagster.definitions import build_defs

    defs = build_defs("dev", {"MNIST_DATA_DIR": str(tmp_path), TIMEZONE_ENV: "Asia/Tokyo"})
    assert defs.get_schedule_def("nightly_batch_predictions").execution_timezone == "Asia/Tokyo"
