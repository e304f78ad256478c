"""Labelled feedback -> a batch in `landing/`: when enough new labels came back from the endpoint, the
sensor launches feedback_to_landing_job, which writes them as a labelled batch for the new-data sensor
to retrain on, through the same gate as any other data.
"""

import hashlib
import os
from collections.abc import Mapping

import dagster as dg

from mnist_dagster.layout import LANDING_PREFIX
from mnist_dagster.resources.storage import StorageResource


MIN_FEEDBACK_ENV = "MNIST_MIN_FEEDBACK"
DEFAULT_MIN_FEEDBACK = 100


def min_feedback(env: Mapping[str, str] = os.environ) -> int:
    """`MNIST_MIN_FEEDBACK`, default 100: how many new labels make a batch worth landing."""
    value = env.get(MIN_FEEDBACK_ENV, "").strip()
    if value and not (value.isdigit() and int(value) > 0):
        raise ValueError(f"{MIN_FEEDBACK_ENV}={value!r}: expected a positive whole number of labels")
    return int(value) if value else DEFAULT_MIN_FEEDBACK


@dg.sensor(
    name="feedback_to_landing_sensor",
    job_name="feedback_to_landing_job",
    default_status=dg.DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=300,
    description=f"Counts the labelled feedback not landed yet (one per prediction, the latest label); at "
    f"{MIN_FEEDBACK_ENV} (default {DEFAULT_MIN_FEEDBACK}) launches feedback_to_landing_job, which writes them "
    f"as a batch in {LANDING_PREFIX}/ for the new-data sensor to retrain on.",
)
def feedback_to_landing_sensor(context: dg.SensorEvaluationContext, storage: StorageResource) -> dg.SensorResult:
    """Reads only; the job writes (a logged run, with what it landed). The run key names the set of labels,
    so a tick repeated before the job finished asks for nothing new."""
    # scipy (seconds to import) only when the sensor ticks: kept off the code location's load
    from mnist_dagster.lifecycle.landing import count_pending

    needed = min_feedback()
    pending = count_pending(storage.open())
    if len(pending) < needed:
        return dg.SensorResult(skip_reason=f"{len(pending)} new label(s), fewer than {MIN_FEEDBACK_ENV}={needed}")
    digest = hashlib.sha256("\n".join(f"{pid}={label}" for pid, label in sorted(pending.items())).encode())
    request = dg.RunRequest(
        run_key=f"feedback:{digest.hexdigest()[:16]}",
        run_config={"ops": {"land_feedback": {"config": {"min_feedback": needed}}}},
        tags={"mnist/feedback_pending": str(len(pending))},
    )
    return dg.SensorResult(run_requests=[request])
