"""Asset jobs for the stages a person launches by hand, and the nightly 2 AM batch schedule."""

import os

import dagster as dg

full_pipeline_job = dg.define_asset_job(
    "full_pipeline_job",
    selection=dg.AssetSelection.all(),
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

nightly_batch_schedule = dg.ScheduleDefinition(
    name="nightly_batch_predictions",
    job=batch_inference_job,
    cron_schedule="0 2 * * *",
    execution_timezone=os.getenv("MNIST_SCHEDULE_TIMEZONE", "UTC"),
    default_status=dg.DefaultScheduleStatus.RUNNING,
)

JOBS = [full_pipeline_job, training_job, batch_inference_job]
SCHEDULES = [nightly_batch_schedule]
