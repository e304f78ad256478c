"""What several sensors share: how many events one tick handles, and which runs belong to this code location."""

import dagster as dg

EVENTS_PER_TICK = 10  # a tick handles at most this many events; the rest follow on the next tick


def in_this_code_location(context: dg.SensorEvaluationContext, run: dg.DagsterRun) -> bool:
    """Runs of every job of this code location, the implicit asset job of automation runs included."""
    origin = run.remote_job_origin
    run_location = origin.repository_origin.code_location_origin.location_name if origin else None
    run_repository = origin.repository_origin.repository_name if origin else None
    sensor_location = context.code_location_origin.location_name if context.code_location_origin else None
    return (run_location, run_repository) == (sensor_location, context.repository_name)
