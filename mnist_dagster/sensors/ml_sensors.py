"""Sensors, all running as soon as the code location loads: new labelled data, declarative automation,
Slack alerts for failed runs, for models the deployment gate kept out, for rollbacks, for the A/B
report's decisions and for prediction drift, labelled feedback into landing/, and the clean-up of MLflow
runs a killed step left RUNNING.

Each sensor keeps its own cursor. The Slack sensors move theirs past an event only once its message
was posted, so a Slack outage delays alerts instead of losing them (dagster's `run_failure_sensor`
advances its cursor whether or not the post worked, which is why it is not used here); the MLflow
clean-up moves its cursor past a run only once that run's MLflow runs are closed.
"""

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import NamedTuple

import dagster as dg

from mnist_dagster.layout import LANDING_PREFIX
from mnist_dagster.resources.mlflow import MlflowSettingsError, MlflowTracking
from mnist_dagster.resources.slack import SlackAlerts
from mnist_dagster.resources.storage import StorageResource

RAW_DATA = dg.AssetKey("raw_mnist_data")
PRODUCTION_MODEL = dg.AssetKey("production_digit_classifier")
AB_TEST_REPORT = dg.AssetKey("ab_test_report")
HIDDEN_JOB_PREFIX = "__"  # __ASSET_JOB, __anonymous_asset_job_<sensor>: runs of an ad-hoc asset selection
EVENTS_PER_TICK = 10  # a tick posts at most this many alerts; the rest follow on the next tick
MAX_FAILED_STEPS_SHOWN = 5
ERROR_LINES_SHOWN = 3
ERROR_LINE_CHARS = 200

# ---------------------------------------------------------------------------------------------
# New labelled data in the landing area -> raw_mnist_data
# ---------------------------------------------------------------------------------------------


class LandingCursor(NamedTuple):
    """What the sensor has seen in `landing/`: key -> `StoredObject.version`, valid and rejected apart."""

    valid: dict[str, str]
    rejected: dict[str, str]

    @classmethod
    def parse(cls, cursor: str | None) -> "LandingCursor":
        """An unreadable cursor counts as "seen nothing": at worst one extra run of raw_mnist_data,
        which retrains nothing if the data did not change (data versions)."""
        try:
            state = json.loads(cursor) if cursor else {}
            return cls(dict(state.get("valid", {})), dict(state.get("rejected", {})))
        except (ValueError, TypeError, AttributeError):
            return cls({}, {})

    def dump(self) -> str:
        return json.dumps({"valid": self.valid, "rejected": self.rejected}, sort_keys=True)

    def knows(self, key: str, version: str) -> bool:
        return self.valid.get(key) == version or self.rejected.get(key) == version

    def fingerprint(self) -> str:
        """Names the valid set, so a run key says "this change, from that state": removing a batch and
        landing it again later is a new change, while re-evaluating one tick repeats its key."""
        return hashlib.sha256(json.dumps(self.valid, sort_keys=True).encode()).hexdigest()[:12]


def _validation_error(payload: bytes) -> str | None:
    """Why a landed file cannot be used (the same check `raw_mnist_data` applies), or None."""
    from mnist_dagster.ml.data import LabelledBatchError, read_labelled_batch

    try:
        read_labelled_batch(payload)
    except LabelledBatchError as error:
        return str(error)
    return None


@dg.sensor(
    name="new_labelled_data_sensor",
    target=[RAW_DATA],
    default_status=dg.DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=60,
    description=(
        f"Watches `{LANDING_PREFIX}/*.npz` in storage and re-materializes raw_mnist_data when a labelled "
        "batch is added, changed or removed; malformed files are reported and skipped."
    ),
)
def new_labelled_data_sensor(context: dg.SensorEvaluationContext, storage: StorageResource) -> dg.SensorResult:
    store = storage.open()
    seen = LandingCursor.parse(context.cursor)
    listed = {item.key: item.version for item in store.list(LANDING_PREFIX) if item.key.endswith(".npz")}
    now = LandingCursor(
        valid={key: version for key, version in listed.items() if seen.valid.get(key) == version},
        rejected={key: version for key, version in listed.items() if seen.rejected.get(key) == version},
    )
    new_or_changed = sorted(key for key, version in listed.items() if not seen.knows(key, version))
    for key in new_or_changed:
        error = _validation_error(store.read_bytes(key))
        if error is None:
            now.valid[key] = listed[key]
        else:
            now.rejected[key] = listed[key]
            context.log.warning(f"Skipping landed file {key}: {error}")
    added = [key for key in new_or_changed if key in now.valid]
    removed = sorted(set(seen.valid) - set(listed))
    if not added and not removed:
        rejected = [key for key in new_or_changed if key in now.rejected]
        reason = f"Rejected malformed {', '.join(rejected)}" if rejected else f"Nothing new in {LANDING_PREFIX}/"
        return dg.SensorResult(skip_reason=reason, cursor=now.dump())
    change = [f"+{key}@{listed[key]}" for key in added] + [f"-{key}@{seen.valid[key]}" for key in removed]
    context.log.info(f"New labelled data: {', '.join(change)}")
    request = dg.RunRequest(
        run_key=f"landing:{seen.fingerprint()}:" + "|".join(change),  # the same change never launches twice
        asset_selection=[RAW_DATA],
        tags={"mnist/landing_added": str(len(added)), "mnist/landing_removed": str(len(removed))},
    )
    return dg.SensorResult(run_requests=[request], cursor=now.dump())


# ---------------------------------------------------------------------------------------------
# Declarative automation: processed data, training, evaluation and deployment follow new data
# ---------------------------------------------------------------------------------------------

automation_sensor = dg.AutomationConditionSensorDefinition(
    "automation_sensor",
    target=dg.AssetSelection.all(),
    default_status=dg.DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=30,
    description="Evaluates the assets' automation conditions (RETRAIN_ON_NEW_DATA) and launches what they request.",
)

# ---------------------------------------------------------------------------------------------
# Slack alerts
# ---------------------------------------------------------------------------------------------


class Alert(NamedTuple):
    storage_id: int  # the event's id in the event log: the sensor's cursor once this alert is handled
    text: str | None  # None: nothing to say about this event, just move past it


def _slack_errors() -> tuple[type[BaseException], ...]:
    """What a Slack outage looks like from slack_sdk: API errors, HTTP/network errors, timeouts."""
    from slack_sdk.errors import SlackClientError

    return (SlackClientError, OSError, ValueError)


def _post_in_order(
    context: dg.SensorEvaluationContext, slack: SlackAlerts, alerts: Iterable[Alert], cursor: int
) -> dg.SensorResult:
    """Posts each alert; the cursor moves past an event only after its message went out."""
    posted = 0
    for alert in alerts:
        if alert.text is not None:
            try:
                slack.post(alert.text)
            except _slack_errors() as error:
                problem = f"{type(error).__name__}: {str(error)[:300]}"
                context.log.warning(f"Could not post to Slack ({problem}); will try again on the next tick")
                return dg.SensorResult(skip_reason=f"Slack post failed, retrying next tick: {problem}", cursor=str(cursor))
            posted += 1
        cursor = alert.storage_id
    return dg.SensorResult(skip_reason=f"Posted {posted} alert(s) to {slack.channel}", cursor=str(cursor))


def _alerting_tick(
    context: dg.SensorEvaluationContext,
    slack: SlackAlerts,
    latest_event_id: Callable[[], int],
    alerts_after: Callable[[int], Iterable[Alert]],
) -> dg.SensorResult:
    """Shared tick logic: the first tick (or an unreadable cursor) starts watching from now;
    without a token the sensor says so and keeps its cursor at now, so turning Slack on later does
    not replay old events."""
    cursor = context.cursor
    if not slack.configured:
        context.log.info("Slack is not configured (SLACK_BOT_TOKEN is unset): no alert is sent.")
        return dg.SensorResult(skip_reason="Slack is not configured (set SLACK_BOT_TOKEN)", cursor=str(latest_event_id()))
    if cursor is None or not cursor.lstrip("-").isdigit():
        return dg.SensorResult(skip_reason="Watching from now on", cursor=str(latest_event_id()))
    return _post_in_order(context, slack, alerts_after(int(cursor)), int(cursor))


def _first_lines(text: str) -> str:
    lines = [line.rstrip()[:ERROR_LINE_CHARS] for line in text.strip().splitlines() if line.strip()]
    return "\n".join(lines[:ERROR_LINES_SHOWN])


def _escape(text: str) -> str:
    """Slack mrkdwn treats &, < and > as markup."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


#: Dagster's wrappers around the exception a step raised: the message is in their `cause`.
DAGSTER_WRAPPERS = {"DagsterExecutionStepExecutionError", "DagsterUserCodeExecutionError", "RetryRequestedFromPolicy"}


def _user_error(error) -> str:
    """The first lines of the exception the step raised (not "Error occurred while executing op",
    not "Exceeded max_retries"), its class without the module path."""
    while error.cause is not None and error.cls_name in DAGSTER_WRAPPERS:
        error = error.cause
    head, separator, rest = error.message.partition(": ")
    if separator and head.endswith(f".{error.cls_name}"):
        return _first_lines(f"{error.cls_name}: {rest}")
    return _first_lines(error.message)


def _run_assets(instance: dg.DagsterInstance, run: dg.DagsterRun) -> list[str]:
    """The assets the run was to materialize (its selection, else what its plan announced)."""
    keys = set(run.asset_selection or ())
    if not keys:
        planned = instance.get_records_for_run(run.run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION_PLANNED)
        keys = {record.event_log_entry.dagster_event.asset_key for record in planned.records}
    return sorted(key.to_user_string() for key in keys if key is not None)


def _what_ran(instance: dg.DagsterInstance, run: dg.DagsterRun) -> str:
    assets = ", ".join(_run_assets(instance, run))
    if run.job_name.startswith(HIDDEN_JOB_PREFIX):
        return f"assets {assets}" if assets else "an asset materialization"
    return f"job `{run.job_name}`" + (f" (assets {assets})" if assets else "")


def _launched_by(run: dg.DagsterRun) -> str:
    for tag, kind in (("dagster/schedule_name", "schedule"), ("dagster/sensor_name", "sensor")):
        if tag in run.tags:
            return f" — launched by {kind} `{run.tags[tag]}`"
    return ""


def _run_failure_text(instance: dg.DagsterInstance, run: dg.DagsterRun, failure_event, run_url: str) -> str:
    """Which job or assets failed, which steps, the error's first lines, and a link to the run."""
    step_failures = instance.get_records_for_run(run.run_id, of_type=dg.DagsterEventType.STEP_FAILURE).records
    lines = [f":rotating_light: *Dagster run failed*: {_escape(_what_ran(instance, run))}{_escape(_launched_by(run))}"]
    for record in step_failures[:MAX_FAILED_STEPS_SHOWN]:
        event = record.event_log_entry.dagster_event
        error = event.step_failure_data.error
        detail = _user_error(error) if error else event.message or "no error recorded"
        lines.append(f"• step `{event.step_key}` failed:\n```{_escape(detail)}```")
    if len(step_failures) > MAX_FAILED_STEPS_SHOWN:
        lines.append(f"… and {len(step_failures) - MAX_FAILED_STEPS_SHOWN} more failed steps")
    if not step_failures:  # the run failed outside any step (launch, run worker, resources)
        error = failure_event.event_specific_data.error if failure_event.event_specific_data else None
        detail = _user_error(error) if error else _first_lines(failure_event.message or "no error recorded")
        lines.append(f"```{_escape(detail)}```")
    lines.append(f"<{run_url}|Open run {run.run_id[:8]} in Dagster>")
    return "\n".join(lines)


def _in_this_code_location(context: dg.SensorEvaluationContext, run: dg.DagsterRun) -> bool:
    """Runs of every job of this code location, the implicit asset job of automation runs included."""
    origin = run.remote_job_origin
    run_location = origin.repository_origin.code_location_origin.location_name if origin else None
    run_repository = origin.repository_origin.repository_name if origin else None
    sensor_location = context.code_location_origin.location_name if context.code_location_origin else None
    return (run_location, run_repository) == (sensor_location, context.repository_name)


@dg.sensor(
    name="slack_on_run_failure",
    default_status=dg.DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=30,
    description="Posts every failed run of this code location (jobs, schedules, sensors, automation) to Slack.",
)
def slack_on_run_failure(context: dg.SensorEvaluationContext, slack: SlackAlerts) -> dg.SensorResult:
    instance = context.instance

    def latest_failure_id() -> int:
        records = instance.fetch_run_status_changes(dg.DagsterEventType.RUN_FAILURE, limit=1).records
        return records[0].storage_id if records else -1

    def alerts_after(cursor: int) -> Iterator[Alert]:
        records = instance.fetch_run_status_changes(
            dg.RunStatusChangeRecordsFilter(event_type=dg.DagsterEventType.RUN_FAILURE, after_storage_id=cursor),
            limit=EVENTS_PER_TICK,
            ascending=True,
        ).records
        for record in records:
            run = instance.get_run_by_id(record.event_log_entry.run_id)
            if run is None or not _in_this_code_location(context, run):
                yield Alert(record.storage_id, None)
            else:
                failure = record.event_log_entry.dagster_event
                yield Alert(record.storage_id, _run_failure_text(instance, run, failure, slack.run_url(run.run_id)))

    return _alerting_tick(context, slack, latest_failure_id, alerts_after)


def _accuracy(value: object) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _production_change_text(materialization: dg.AssetMaterialization, run_id: str, run_url: str) -> str | None:
    """What Slack hears about a materialization of `production_digit_classifier`: the gate's refusal and a
    rollback are news; a deployment past the gate is not, and a promotion is told by the A/B report's alert."""
    metadata = {key: value.value for key, value in materialization.metadata.items()}
    if metadata.get("deployed") is False:
        lines = [
            f":warning: *New model not deployed*: {_escape(str(metadata.get('reason', 'no reason recorded')))}.",
            f"Test accuracy {_accuracy(metadata.get('test_accuracy'))}, threshold {metadata.get('threshold')}; "
            f"production stays at model version {metadata.get('model_version')}.",
        ]
    elif metadata.get("decision") == "rolled back":
        lines = [
            f":rewind: *Production rolled back* from version {metadata.get('previous_version')} to version "
            f"{metadata.get('model_version')}: {_escape(str(metadata.get('reason', 'no reason recorded')))}.",
        ]
    else:
        return None
    if run_id:  # a materialization reported from outside a run has none
        lines.append(f"<{run_url}|Open run {run_id[:8]} in Dagster>")
    return "\n".join(lines)


def _materialization_alerts(
    instance: dg.DagsterInstance, asset_key: dg.AssetKey, slack: SlackAlerts, text: Callable[..., str | None]
) -> tuple[Callable[[], int], Callable[[int], Iterator[Alert]]]:
    """(latest event id, alerts after a cursor) for the materializations of one asset, each told by `text`."""

    def latest_materialization_id() -> int:
        records = instance.fetch_materializations(asset_key, limit=1).records
        return records[0].storage_id if records else -1

    def alerts_after(cursor: int) -> Iterator[Alert]:
        records = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=asset_key, after_storage_id=cursor), limit=EVENTS_PER_TICK, ascending=True
        ).records
        for record in records:
            yield Alert(record.storage_id, text(instance, record, slack.run_url(record.run_id)))

    return latest_materialization_id, alerts_after


@dg.sensor(
    name="slack_on_model_not_deployed",
    default_status=dg.DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=60,
    description="Posts to Slack, once each, when a trained model fails the deployment gate and when production "
    "is rolled back.",
)
def slack_on_model_not_deployed(context: dg.SensorEvaluationContext, slack: SlackAlerts) -> dg.SensorResult:
    def text(_instance: dg.DagsterInstance, record: dg.EventLogRecord, run_url: str) -> str | None:
        return _production_change_text(record.asset_materialization, record.run_id, run_url)

    latest, alerts_after = _materialization_alerts(context.instance, PRODUCTION_MODEL, slack, text)
    return _alerting_tick(context, slack, latest, alerts_after)


def _ab_decision_text(metadata: dict, run_id: str, run_url: str) -> str:
    """The A/B report's decision, its numbers and whether the challenger was promoted, in a few lines."""
    trial = f"A/B test ({metadata['strategy']})"
    production, challenger = metadata["production_version"], metadata["challenger_version"]
    if metadata["decision"] == "promote":
        head = f":trophy: *{trial}: challenger version {challenger} beats production version {production}*"
        outcome = (
            f"Promoted: version {challenger} is production now, on the endpoint and in MLflow."
            if metadata.get("promoted")
            else "Not promoted (auto_promote is off): materialize ab_test_report with `auto_promote: true` to do it."
        )
    else:
        head = f":scales: *{trial}: keep production version {production}* ({metadata['finding']})"
        outcome = f"Challenger version {challenger} stays on trial."
        if metadata.get("trial_over"):  # a guardrail breach, a significantly worse challenger, or the planned end
            ended = " Production serves alone." if metadata.get("trial_ended") else ""
            outcome = f"The trial of challenger version {challenger} is over: {metadata['finding']}.{ended}"
    numbers = _escape(str(metadata["why"]))  # both accuracies with their n, the test and its p-value
    if metadata.get("agreement_rate") is not None:
        numbers += f"; the two models agreed on {_percent(metadata['agreement_rate'])} of shadowed requests"
    lines = [head, f"{numbers}.", outcome]
    if run_id:
        lines.append(f"<{run_url}|Open run {run_id[:8]} in Dagster>")
    return "\n".join(lines)


def _percent(value: object) -> str:
    return f"{100 * value:.2f}%" if isinstance(value, float) else str(value)


def _ab_report_text(instance: dg.DagsterInstance, record: dg.EventLogRecord, run_url: str) -> str | None:
    """A decision is news (`promote`, or `keep`) when it is new for this pair of versions: the daily report
    repeating yesterday's `keep` says nothing; `need_more_data` and "no trial" never are."""
    metadata = _metadata(record)
    if metadata.get("decision") not in {"promote", "keep"}:
        return None
    earlier = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=AB_TEST_REPORT, before_storage_id=record.storage_id), limit=1
    ).records
    news = ("decision", "finding", "production_version", "challenger_version", "promoted")
    if earlier and all(_metadata(earlier[0]).get(key) == metadata.get(key) for key in news):
        return None
    return _ab_decision_text(metadata, record.run_id, run_url)


def _metadata(record: dg.EventLogRecord) -> dict:
    return {key: value.value for key, value in record.asset_materialization.metadata.items()}


@dg.sensor(
    name="slack_on_ab_test_decision",
    default_status=dg.DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=60,
    description="Posts to Slack, once each, what ab_test_report decided (promote or keep, with the numbers, and "
    "whether the challenger was promoted), when the decision is new for the trial.",
)
def slack_on_ab_test_decision(context: dg.SensorEvaluationContext, slack: SlackAlerts) -> dg.SensorResult:
    latest, alerts_after = _materialization_alerts(context.instance, AB_TEST_REPORT, slack, _ab_report_text)
    return _alerting_tick(context, slack, latest, alerts_after)


PREDICTION_DRIFT = dg.AssetKey("prediction_drift")


def _drift_text(metadata: dict, run_id: str, run_url: str) -> str | None:
    """A run of prediction_drift that detected drift is news, once: which statistics moved, from what to
    what, against which threshold. A run without drift (or with too little traffic) says nothing."""
    if metadata.get("drift_detected") is not True:
        return None
    icon = ":rotating_light:" if metadata.get("severity") == "severe" else ":warning:"
    lines = [
        (
            f"{icon} *Prediction drift ({metadata.get('severity')})* on production model version "
            f"{metadata.get('model_version')}: {metadata.get('traffic')} predictions since the last check moved."
        )
    ]
    for row in metadata.get("moved") or []:
        limit = row["severe"] if row["severity"] == "severe" else row["moderate"]
        lines.append(
            f"• `{row['statistic']}` {_escape(str(row['reference']))} → {_escape(str(row['current']))} "
            f"({_escape(row['test'])}: {row['value']} ≥ {limit}, p={row['p_value']})"
        )
    if run_id:
        lines.append(f"<{run_url}|Open run {run_id[:8]} in Dagster>")
    return "\n".join(lines)


@dg.sensor(
    name="slack_on_prediction_drift",
    default_status=dg.DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=60,
    description="Posts to Slack, once per detection, when prediction_drift finds the production model's "
    "traffic has drifted: which statistics moved, from what to what.",
)
def slack_on_prediction_drift(context: dg.SensorEvaluationContext, slack: SlackAlerts) -> dg.SensorResult:
    def text(_instance: dg.DagsterInstance, record: dg.EventLogRecord, run_url: str) -> str | None:
        return _drift_text(_metadata(record), record.run_id, run_url)

    latest, alerts_after = _materialization_alerts(context.instance, PREDICTION_DRIFT, slack, text)
    return _alerting_tick(context, slack, latest, alerts_after)


# ---------------------------------------------------------------------------------------------
# Labelled feedback -> a batch in landing/
# ---------------------------------------------------------------------------------------------

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
    from mnist_dagster.serving.feedback import count_pending

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


# ---------------------------------------------------------------------------------------------
# MLflow runs left RUNNING by a killed step
# ---------------------------------------------------------------------------------------------

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
        if run is not None and _in_this_code_location(context, run):
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


# ---------------------------------------------------------------------------------------------
# A sweep's winner -> training_job -> the gate
# ---------------------------------------------------------------------------------------------

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


SENSORS = [
    new_labelled_data_sensor,
    automation_sensor,
    slack_on_run_failure,
    slack_on_model_not_deployed,
    slack_on_ab_test_decision,
    slack_on_prediction_drift,
    feedback_to_landing_sensor,
    close_orphaned_mlflow_runs,
    sweep_winner_sensor,
]
