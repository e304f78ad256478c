"""The code location: every asset, job, schedule and sensor, with resources chosen by environment."""

import os
from collections.abc import Mapping

import dagster as dg

from mnist_dagster.assets import data_assets, experiment_assets, model_assets, monitoring_assets, prediction_assets
from mnist_dagster.jobs.ml_jobs import JOBS, schedules_for
from mnist_dagster.resources import deployment_name, executor_for, resources_for
from mnist_dagster.sensors import SENSORS

ASSET_MODULES = [data_assets, model_assets, prediction_assets, experiment_assets, monitoring_assets]


def build_defs(deployment: str | None = None, env: Mapping[str, str] = os.environ) -> dg.Definitions:
    """`deployment` and `env` default to the process environment; tests pass their own."""
    deployment = deployment or deployment_name(env)
    return dg.Definitions(
        assets=[*dg.load_assets_from_modules(ASSET_MODULES), experiment_assets.candidate_leaderboard],
        asset_checks=dg.load_asset_checks_from_modules(ASSET_MODULES),
        jobs=JOBS,
        schedules=schedules_for(env),
        sensors=SENSORS,
        resources=resources_for(deployment, env),
        executor=executor_for(deployment, env),
    )


defs = build_defs()
