"""Jobs a person launches by hand, and the daily schedules: the 2 AM batch, the 2:30 drift check and the 3 AM
A/B test report; the job that lands labelled feedback.

Retries live on the steps that do I/O (`raw_mnist_data`, `production_digit_classifier`, and the
batch job's S3 reads and writes); training and evaluation are never retried, since a crash or a
model below the gate fails the same way again. Neither is a rollback or a promotion: done twice, it would
undo itself.
"""

import os
from collections.abc import Mapping

import dagster as dg

from mnist_dagster.assets.deployment_ops import roll_back_production
from mnist_dagster.assets.experiment_assets import model_sweep
from mnist_dagster.assets.monitoring_assets import land_feedback
from mnist_dagster.assets.prediction_assets import batch_fanout

TIMEZONE_ENV = "MNIST_SCHEDULE_TIMEZONE"
NIGHTLY_CRON = "0 2 * * *"  # 02:00 every day, in the schedule's time zone
AB_REPORT_CRON = "0 3 * * *"  # 03:00, after the nightly batch
DRIFT_CRON = "30 2 * * *"  # 02:30: the nightly batch (02:00) scores the inbox in minutes

full_pipeline_job = dg.define_asset_job(
    "full_pipeline_job",
    selection=dg.AssetSelection.all(),  # executable assets only: the sweep's external leaderboard is not among them
    description="Download, process, train, evaluate, deploy past the gate, then predict.",
)
training_job = dg.define_asset_job(
    "training_job",
    selection=dg.AssetSelection.assets("digit_classifier", "model_evaluation", "production_digit_classifier"),
    description="Train, evaluate and (past the gate) deploy on the current processed data.",
)
batch_inference_job = dg.define_asset_job(
    "batch_inference_job",
    selection=dg.AssetSelection.assets("batch_digit_predictions"),
    description="Score everything new in the inference inbox with the production model.",
)
ab_test_report_job = dg.define_asset_job(
    "ab_test_report_job",
    selection=dg.AssetSelection.assets("ab_test_report"),
    description="Judge the challenger on live traffic and feedback: promote, keep or need_more_data.",
)

prediction_drift_job = dg.define_asset_job(
    "prediction_drift_job",
    selection=dg.AssetSelection.assets("prediction_drift"),
    description="Compare the production model's traffic since the last run with its reference: drift alarms.",
)


@dg.job(
    description="Write the new labelled feedback as a batch in landing/ (the new-data sensor then retrains "
    "through the gate); launched by feedback_to_landing_sensor once min_feedback new labels exist."
)
def feedback_to_landing_job():
    land_feedback()


@dg.job(
    description="Put an earlier production version back (default: the previous one), on the endpoint within "
    "seconds; config `version` names another. A missing or corrupt bundle fails and changes nothing."
)
def rollback_job():
    roll_back_production()


def schedule_timezone(env: Mapping[str, str] = os.environ) -> str:
    """`MNIST_SCHEDULE_TIMEZONE`, default UTC (checked when the schedule is built)."""
    return env.get(TIMEZONE_ENV, "").strip() or "UTC"


def nightly_batch_schedule(timezone: str = "UTC") -> dg.ScheduleDefinition:
    """`batch_inference_job` at 02:00 in `timezone`, running as soon as the code location loads."""
    return _daily(
        "nightly_batch_predictions", batch_inference_job, NIGHTLY_CRON, timezone,
        "Scores the inference inbox with the production model every night at 02:00.",
    )  # fmt: skip


def ab_test_report_schedule(timezone: str = "UTC") -> dg.ScheduleDefinition:
    """`ab_test_report_job` at 03:00 in `timezone`: a day's feedback, judged once a day (it promotes only
    when its config says `auto_promote`; the schedule runs it with the defaults)."""
    return _daily(
        "daily_ab_test_report", ab_test_report_job, AB_REPORT_CRON, timezone,
        "Reports champion vs challenger on live traffic every day at 03:00: promote, keep or need_more_data.",
    )  # fmt: skip


def prediction_drift_schedule(timezone: str = "UTC") -> dg.ScheduleDefinition:
    """`prediction_drift_job` at 02:30 in `timezone`: after the 2 AM batch, so its tables are judged with
    the day's endpoint traffic (a batch still running then is judged the next day: nothing is lost)."""
    return _daily(
        "daily_prediction_drift", prediction_drift_job, DRIFT_CRON, timezone,
        "Checks the production model's traffic for drift every day at 02:30, after the nightly batch.",
    )  # fmt: skip


def _daily(name: str, job, cron: str, timezone: str, description: str) -> dg.ScheduleDefinition:
    """A schedule on from the start. An unknown zone fails the load, naming the variable, rather than
    scheduling at a surprising hour."""
    try:
        return dg.ScheduleDefinition(
            name=name,
            job=job,
            cron_schedule=cron,
            execution_timezone=timezone,
            default_status=dg.DefaultScheduleStatus.RUNNING,
            description=description,
        )
    except dg.DagsterInvalidDefinitionError as error:
        raise ValueError(
            f"{TIMEZONE_ENV}={timezone!r} is not a known time zone; use an IANA name such as "
            "'UTC', 'Europe/Berlin' or 'America/New_York'"
        ) from error


model_sweep_job = model_sweep.to_job(
    "model_sweep_job",
    description="Train and evaluate the named candidates side by side; report candidate_leaderboard.",
)

batch_fanout_job = batch_fanout.to_job(
    "batch_fanout_job",
    description="The nightly batch for a large backlog: the new inbox files split into shards scored as parallel "
    "steps (a process each, a pod each on k8s), the ledger written once; nothing is scored twice.",
)

JOBS = [
    full_pipeline_job, training_job, batch_inference_job, ab_test_report_job, rollback_job, model_sweep_job,
    prediction_drift_job, feedback_to_landing_job, batch_fanout_job,
]  # fmt: skip


def schedules_for(env: Mapping[str, str] = os.environ) -> list[dg.ScheduleDefinition]:
    """The schedules, with `MNIST_SCHEDULE_TIMEZONE` read from `env` when the definitions are built."""
    timezone = schedule_timezone(env)
    return [nightly_batch_schedule(timezone), ab_test_report_schedule(timezone), prediction_drift_schedule(timezone)]
