"""Alerting: Slack messages for failed runs, for models the deployment gate kept out, for rollbacks, for the
A/B report's decisions and for prediction drift.

Each sensor keeps its own cursor and moves it past an event only once its message was posted, so a Slack
outage delays alerts instead of losing them (dagster's `run_failure_sensor` advances its cursor whether or
not the post worked, which is why it is not used here).
"""

from collections.abc import Callable, Iterable, Iterator
from typing import NamedTuple

import dagster as dg
from slack_sdk.errors import SlackClientError

from mnist_dagster.resources.slack import SlackAlerts
from mnist_dagster.sensors.common import EVENTS_PER_TICK, in_this_code_location

PRODUCTION_MODEL = dg.AssetKey("production_digit_classifier")
AB_TEST_REPORT = dg.AssetKey("ab_test_report")
PREDICTION_DRIFT = dg.AssetKey("prediction_drift")
HIDDEN_JOB_PREFIX = "__"  # __ASSET_JOB, __anonymous_asset_job_<sensor>: runs of an ad-hoc asset selection
MAX_FAILED_STEPS_SHOWN = 5
ERROR_LINES_SHOWN = 3
ERROR_LINE_CHARS = 200


class Alert(NamedTuple):
    storage_id: int  # the event's id in the event log: the sensor's cursor once this alert is handled
    text: str | None  # None: nothing to say about this event, just move past it


#: What a Slack outage looks like from slack_sdk: API errors, HTTP/network errors, timeouts.
SLACK_ERRORS: tuple[type[BaseException], ...] = (SlackClientError, OSError, ValueError)


def _post_in_order(
    context: dg.SensorEvaluationContext, slack: SlackAlerts, alerts: Iterable[Alert], cursor: int
) -> dg.SensorResult:
    """Posts each alert; the cursor moves past an event only after its message went out."""
    posted = 0
    for alert in alerts:
        if alert.text is not None:
            try:
                slack.post(alert.text)
            except SLACK_ERRORS as error:
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
            if run is None or not in_this_code_location(context, run):
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


def _drift_text(metadata: dict, run_id: str, run_url: str) -> str | None:
    """A run of prediction_drift that detected drift is news, once: which statistics moved, from what to
    what, against which threshold. A run without drift (or with too little traffic) says nothing."""
    if metadata.get("drift_detected") is not True:
        return None
    icon = ":rotating_light:" if metadata.get("severity") == "severe" else ":warning:"
    lines = [
        (
            f"{icon} *Prediction drift ({metadata.get('severity')})*, worst in `{metadata.get('worst_window')}` "
            f"(model version {metadata.get('model_version')}): {metadata.get('traffic')} predictions since the last "
            "check judged."
        )
    ]
    for row in metadata.get("moved") or []:
        limit = row["severe"] if row["severity"] == "severe" else row["moderate"]
        lines.append(
            f"• `{row['window']}` `{row['statistic']}` {_escape(str(row['reference']))} → {_escape(str(row['current']))} "
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


FEEDBACK_QUARANTINE = dg.AssetKey("feedback_quarantine")  # reported by feedback_to_landing_job's land_feedback


def _quarantine_text(metadata: dict, run_id: str, run_url: str) -> str | None:
    """Who had labels held back from landing/ and why: their share of the batch, or how far their labels
    disagree with the model compared with everyone else's (the test and its level)."""
    if not metadata.get("quarantined"):
        return None
    clients = metadata.get("quarantined_clients") or []
    lines = [
        f":shield: *Feedback quarantined*: {metadata['quarantined']} label(s) from {len(clients)} client(s) held "
        f"back from landing/ as likely poisoning; {metadata.get('landed', 0)} label(s) from other clients landed."
    ]
    for row in clients:
        if row["verdict"] == "share":
            why = f"{_percent(row['share'])} of the batch"
        else:
            p_value = f"p={row['p_value']}" if row["p_value"] else "p < 1e-300"  # 0.0: below a float's range
            why = (
                f"disagrees with the model on {_percent(row['disagreement'])} of its labels, the others on "
                f"{_percent(row['others'])} ({p_value})"
            )
        client = _escape(str(row["client"])).replace("`", "'")
        lines.append(f"• `{client}`: {row['labels']} label(s), {why}")
    lines.append(f"Rule: {_escape(str(metadata.get('rule', '')))}")
    lines.append(f"Kept in `{metadata.get('quarantine_key')}`: move it to landing/ to release it.")
    if run_id:
        lines.append(f"<{run_url}|Open run {run_id[:8]} in Dagster>")
    return "\n".join(lines)


@dg.sensor(
    name="slack_on_feedback_quarantine",
    default_status=dg.DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=60,
    description="Posts to Slack, once each, when feedback -> landing quarantined a client's labels as likely "
    "poisoning: which clients, how many labels, and why.",
)
def slack_on_feedback_quarantine(context: dg.SensorEvaluationContext, slack: SlackAlerts) -> dg.SensorResult:
    def text(_instance: dg.DagsterInstance, record: dg.EventLogRecord, run_url: str) -> str | None:
        return _quarantine_text(_metadata(record), record.run_id, run_url)

    latest, alerts_after = _materialization_alerts(context.instance, FEEDBACK_QUARANTINE, slack, text)
    return _alerting_tick(context, slack, latest, alerts_after)
