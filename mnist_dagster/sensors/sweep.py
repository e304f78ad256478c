"""A sweep's winner -> training_job -> the gate: when a model sweep ran with deploy_winner, its winner is
trained again with the same settings and seed, and production_digit_classifier's gate judges it.
"""

import dagster as dg

from mnist_dagster.sensors.common import EVENTS_PER_TICK


LEADERBOARD = dg.AssetKey("candidate_leaderboard")


@dg.sensor(
    name="sweep_winner_sensor",
    job_name="training_job",
    default_status=dg.DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=30,
    description="When a model sweep ran with deploy_winner, trains its winner through training_job: the "
    "same settings and seed give the same model, and production_digit_classifier's gate judges it.",
)
def sweep_winner_sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult:
    after = int(context.cursor) if (context.cursor or "").isdigit() else -1
    records = context.instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=LEADERBOARD, after_storage_id=after), limit=EVENTS_PER_TICK, ascending=True
    ).records
    requests = []
    for record in records:
        metadata = {key: value.value for key, value in record.asset_materialization.metadata.items()}
        if metadata.get("deploy_winner") is True:
            config = {"candidate": metadata["winner"], **metadata["winner_settings"]}
            requests.append(
                dg.RunRequest(
                    run_key=f"sweep-winner:{record.storage_id}",
                    run_config={"ops": {"digit_classifier": {"config": config}}},
                    tags={"mnist/sweep_run_id": record.run_id, "mnist/candidate": metadata["winner"]},
                )
            )
    cursor = str(records[-1].storage_id) if records else context.cursor
    return dg.SensorResult(run_requests=requests, cursor=cursor, skip_reason=None if requests else "no winner to deploy")
