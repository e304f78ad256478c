"""The code location: every asset, job, schedule and sensor, with resources chosen by environment."""

import dagster as dg

from mnist_dagster.assets import data_assets, model_assets, prediction_assets
from mnist_dagster.jobs.ml_jobs import batch_inference_job, full_pipeline_job, nightly_batch_schedule, training_job
from mnist_dagster.resources import deployment_name, resources_for
from mnist_dagster.sensors.ml_sensors import automation_sensor


def build_defs(deployment: str | None = None) -> dg.Definitions:
    deployment = deployment or deployment_name()
    return dg.Definitions(
        assets=dg.load_assets_from_modules([data_assets, model_assets, prediction_assets]),
        asset_checks=dg.load_asset_checks_from_modules([data_assets]),
        jobs=[full_pipeline_job, training_job, batch_inference_job],
        schedules=[nightly_batch_schedule],
        sensors=[automation_sensor],
        resources=resources_for(deployment),
        # dev: every step in the run's own process, so torch, MLflow and the data load once per run.
        executor=dg.in_process_executor if deployment == "dev" else dg.multiprocess_executor,
    )


defs = build_defs()
