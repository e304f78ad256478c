"""MLflow runs left RUNNING by a killed step: a step killed by the OOM killer (or a canceled run) never
ends its MLflow run, so this sensor marks those runs KILLED and says so in the Dagster run's log.

The cursor moves past a run end only once that run's MLflow runs are closed.
"""

import time

import dagster as dg

from mnist_dagster.resources.mlflow import MlflowSettingsError, MlflowTracking
from mnist_dagster.sensors.common import EVENTS_PER_TICK, in_this_code_location


#: Run ends after which no step of the run is left to close its MLflow runs.
RUN_END_EVENTS = (dg.DagsterEventType.RUN_FAILURE, dg.DagsterEventType.RUN_CANCELED)
#: On its first tick the sensor also looks at runs that ended this long ago (see `_first_cursor`).
ORPHAN_LOOK_BACK_SECONDS = 24 * 60 * 60
#: What the sensor leaves on the Dagster run, besides an engine event in its log: the MLflow run ids it closed.
KILLED_RUNS_TAG = "mlflow/orphaned_runs_killed"


def _run_ends_after(instance: dg.DagsterInstance, cursor: int, limit: int) -> list[dg.EventLogRecord]:
    """The first `limit` RUN_FAILURE/RUN_CANCELED records after storage id `cursor`, oldest first.

    One query per type; the first `limit` of the merged lists are exactly the first `limit` of both
    types together, so the cursor can move past the last of them without skipping any."""
    records = [
        record
        for event_type in RUN_END_EVENTS
        for record in instance.fetch_run_status_changes(
            dg.RunStatusChangeRecordsFilter(event_type=event_type, after_storage_id=cursor), limit=limit, ascending=True
        ).records
    ]
    return sorted(records, key=lambda record: record.storage_id)[:limit]


def _first_cursor(instance: dg.DagsterInstance, now: float) -> int:
    """Where the first tick starts: just before the first run end of the last `ORPHAN_LOOK_BACK_SECONDS`.

    A look-back rather than "from now on" (the Slack sensors' choice): the run that prompts someone to
    turn this sensor on, or one killed while the daemon restarted and the cursor was lost, left its
    MLflow runs RUNNING too. Replaying is harmless here, unlike a Slack alert: only runs still RUNNING
    are closed, so a run end seen twice changes nothing the second time."""
    starts = []
    for event_type in RUN_END_EVENTS:
        since = dg.RunStatusChangeRecordsFilter(event_type=event_type, after_timestamp=now - ORPHAN_LOOK_BACK_SECONDS)
        records = instance.fetch_run_status_changes(since, limit=1, ascending=True).records
        starts += [records[0].storage_id - 1] if records else []
    if starts:
        return min(starts)
    latest = [instance.fetch_run_status_changes(event_type, limit=1).records for event_type in RUN_END_EVENTS]
    return max([records[0].storage_id for records in latest if records], default=-1)


def _report_closed(context: dg.SensorEvaluationContext, run: dg.DagsterRun, status: str, closed: list[str]) -> None:
    """Says which MLflow runs were closed in the sensor's log and in the Dagster run's own log and tags,
    where a person looking at the failed run finds it."""
    message = (
        f"Dagster run {run.run_id} ended {status} with {len(closed)} MLflow run(s) still RUNNING "
        f"(its step was killed before it could end them); marked KILLED: {', '.join(closed)}"
    )
    context.log.info(message)
    context.instance.report_engine_event(message, run)
    context.instance.add_run_tags(run.run_id, {KILLED_RUNS_TAG: ",".join(closed)})


@dg.sensor(
    name="close_orphaned_mlflow_runs",
    default_status=dg.DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=30,
    description=(
        "Marks KILLED the MLflow runs left RUNNING by a failed or canceled run of this code location "
        "(a step killed by the OOM killer never ends its MLflow run), and says so in the Dagster run's log."
    ),
)
def close_orphaned_mlflow_runs(context: dg.SensorEvaluationContext, mlflow: MlflowTracking) -> dg.SensorResult:
    """The cursor moves past a run end only once its MLflow runs are closed: an MLflow outage delays
    the clean-up to a later tick instead of losing it."""
    instance = context.instance
    cursor = context.cursor
    handled = int(cursor) if cursor and cursor.lstrip("-").isdigit() else _first_cursor(instance, time.time())
    closed_total = 0
    for record in _run_ends_after(instance, handled, EVENTS_PER_TICK):
        run = instance.get_run_by_id(record.run_id)
        if run is not None and in_this_code_location(context, run):
            canceled = record.event_log_entry.dagster_event_type == dg.DagsterEventType.RUN_CANCELED
            status = "CANCELED" if canceled else "FAILURE"
            try:
                closed = mlflow.close_orphaned_runs(run.run_id, status)
            except MlflowSettingsError as error:
                context.log.warning(f"Could not close the MLflow runs of Dagster run {run.run_id}: {error}")
                return dg.SensorResult(skip_reason=f"MLflow failed, retrying next tick: {error}", cursor=str(handled))
            if closed:
                _report_closed(context, run, status, closed)
                closed_total += len(closed)
        handled = record.storage_id
    return dg.SensorResult(skip_reason=f"Marked {closed_total} orphaned MLflow run(s) KILLED", cursor=str(handled))
