"""Champion vs challenger on live traffic: join what the endpoint answered with the labels clients sent
back, per client, and ask the sequential decision (`lifecycle/sequential.py`) whether the trial is over.

Dagster-free, so the report can be read and tested on its own; `ab_test_report` runs it and shows it.

    prediction_log/  {"time", "prediction_id", "arm", "model_version", "digit", ["client"], ["status"],
                      ["latency_ms"], ["shadow_digit", "shadow_version"], ...}
    feedback/        {"time", "prediction_id", "label", ...}   several for one id: the latest is believed

Only the current trial counts: lines written at or after the record's `trial_started_at` (not the day it
started on), of the production version answered by production and of the challenger version answered by
the challenger (or, in shadow mode, scored by it beside production).

The unit is the client: a line's `client` (a hash of the `X-Client-Key` the request came with) groups its
requests; a line without one is its own client. The guardrails read every line of the trial, labelled or not: `status`
>= 500 or an `error` counts as an error, `latency_ms` feeds the p99; lines without them count as answered
and untimed.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import numpy as np

from mnist_dagster.layout import FEEDBACK_PREFIX, PREDICTION_LOG_PREFIX
from mnist_dagster.lifecycle.record import DeploymentError, DeploymentRecord, Strategy, change_record, read_record
from mnist_dagster.lifecycle.sequential import (
    ArmCounts,
    ArmServing,
    Decision,
    Plan,
    decide_ab_test,
    decide_shadow,
    rule_text,
)
from mnist_dagster.ml.compare import wilson_interval
from mnist_dagster.serving.feedback import latest_labels
from mnist_dagster.serving.prediction_log import read_prediction_log
from mnist_dagster.storage import Store
from mnist_dagster.storage.jsonl import read_json_lines

SECONDS_PER_DAY = 86_400.0


@dataclass(frozen=True)
class Trial:
    """The challenger on trial beside production: how traffic is split, which trial, and since when."""

    strategy: str  # a `Strategy` value: ab_test or shadow
    production_version: str
    challenger_version: str
    trial_id: str
    started_at: datetime | None  # the moment the challenger was published: no line of this trial is older

    def days(self, now: datetime) -> float:
        """How long the trial has run, in days (0 when its start is unknown)."""
        return max(0.0, (now - self.started_at).total_seconds() / SECONDS_PER_DAY) if self.started_at else 0.0


def current_trial(store: Store) -> Trial | None:
    """The trial running now, from the deployment record; None when production serves alone."""
    record = read_record(store)
    if record.challenger is None or record.production is None:
        return None
    started = datetime.fromisoformat(record.trial_started_at) if record.trial_started_at else None
    return Trial(str(record.strategy), record.production, record.challenger, trial_id_of(record), started)


def trial_id_of(record: DeploymentRecord) -> str:
    """The record's trial id (a record written before trial ids: its pair of versions)."""
    return record.trial_id or f"{record.production}-vs-{record.challenger}"


def end_trial(store: Store, trial: Trial) -> bool:
    """End `trial` after a `keep` that closes it (a guardrail breach, a significantly worse challenger, the
    planned end): production serves alone. False when the record already moved on (another trial, a
    promotion), which is then left alone."""

    def end(record: DeploymentRecord) -> DeploymentRecord:
        if record.challenger is None or trial_id_of(record) != trial.trial_id:
            raise DeploymentError(f"trial {trial.trial_id} is no longer the one running")
        return record.without_challenger()

    try:
        change_record(store, end)
    except DeploymentError:
        return False
    return True


def read_trial_logs(store: Store, trial: Trial, now: datetime | None = None) -> tuple[list[dict], list[dict]]:
    """(prediction lines since the trial started, feedback lines from its first day on): only the days
    of the trial are listed, and the first day's lines from before the start are dropped."""
    if trial.started_at is None:
        return read_prediction_log(store), read_json_lines(store, FEEDBACK_PREFIX)
    first = trial.started_at.astimezone(timezone.utc).date()
    last = (now or datetime.now(timezone.utc)).date() + timedelta(days=1)  # a writer's clock a little ahead
    days = [first + timedelta(days=offset) for offset in range((last - first).days + 1)]

    def lines(read: Callable[[Store, str], list[dict]], prefix: str) -> list[dict]:
        return [line for day in days for line in read(store, f"{prefix}/date={day.isoformat()}")]

    logged = lines(read_prediction_log, PREDICTION_LOG_PREFIX)
    predictions = [line for line in logged if _time(line) >= trial.started_at]
    return predictions, lines(read_json_lines, FEEDBACK_PREFIX)


def _time(line: dict) -> datetime:
    return datetime.fromisoformat(line["time"])


def client_of(line: dict) -> str:
    """The client a line counts for: its key, or the request itself when it came without one."""
    return f"key:{line['client']}" if line.get("client") else f"request:{line['prediction_id']}"


def trial_lines(predictions: Iterable[dict], trial: Trial) -> list[dict]:
    """The trial's lines, once per prediction id: each arm's own version only."""
    arm_versions = {"production": trial.production_version, "challenger": trial.challenger_version}
    kept, seen = [], set()
    for line in predictions:
        if line["prediction_id"] in seen or arm_versions.get(line["arm"]) != str(line["model_version"]):
            continue
        seen.add(line["prediction_id"])
        kept.append(line)
    return kept


@dataclass(frozen=True)
class Labelled:
    """One prediction of the trial a client labelled: what each model said, the truth, and whose it was."""

    arm: str  # "production" | "challenger": which model answered
    digit: int
    label: int
    client: str
    shadow_digit: int | None = None  # shadow mode: the challenger's answer to the same request


def labelled_predictions(lines: Iterable[dict], labels: dict[str, int], trial: Trial) -> list[Labelled]:
    """The trial's lines that have a label (in shadow mode, the challenger's digit when it scored them)."""
    joined = []
    for line in lines:
        if line["prediction_id"] not in labels or line.get("digit") is None:
            continue
        shadowed = line.get("shadow_digit") is not None and str(line.get("shadow_version")) == trial.challenger_version
        shadow_digit = int(line["shadow_digit"]) if shadowed else None
        label = labels[line["prediction_id"]]
        joined.append(Labelled(line["arm"], int(line["digit"]), label, client_of(line), shadow_digit))
    return joined


def per_client(items: list[Labelled], right: list[bool]) -> ArmCounts:
    """Labelled requests and correct answers summed per client: the counts the decision's variance needs."""
    requests: dict[str, int] = defaultdict(int)
    correct: dict[str, int] = defaultdict(int)
    for item, ok in zip(items, right, strict=True):
        requests[item.client] += 1
        correct[item.client] += ok
    clients = list(requests)
    return ArmCounts.from_clients([requests[c] for c in clients], [correct[c] for c in clients])


def serving_of(lines: list[dict]) -> tuple[ArmServing, ArmServing]:
    """The guardrails' evidence per arm (production, challenger): every line of the trial, labelled or not."""
    return _arm_serving([line for line in lines if line["arm"] == "production"]), _arm_serving(
        [line for line in lines if line["arm"] == "challenger"]
    )


def _arm_serving(lines: list[dict]) -> ArmServing:
    errors = sum(int(line.get("status", 200)) >= 500 or bool(line.get("error")) for line in lines)
    latencies = [float(line["latency_ms"]) for line in lines if line.get("latency_ms") is not None]
    p99 = float(np.percentile(latencies, 99)) if latencies else None
    return ArmServing(len(lines), errors, p99, len(latencies))


@dataclass(frozen=True)
class Arm:
    """One model's record on labelled live traffic, with a 95% Wilson interval for its accuracy."""

    name: str
    version: str
    counts: ArmCounts
    served: ArmServing
    interval: tuple[float, float]

    @property
    def accuracy(self) -> float | None:
        return self.counts.accuracy

    def row(self) -> dict:
        """The arm as a table row a person reads."""
        accuracy = "n/a" if self.accuracy is None else round(self.accuracy, 4)
        p99 = "n/a" if self.served.p99_ms is None else round(self.served.p99_ms, 1)
        return {
            "arm": self.name, "model_version": self.version, "labelled": self.counts.requests,
            "clients": self.counts.clients, "correct": self.counts.correct, "accuracy": accuracy,
            "ci95_low": round(self.interval[0], 4), "ci95_high": round(self.interval[1], 4),
            "served": self.served.requests, "errors": self.served.errors, "p99_ms": p99,
        }  # fmt: skip


def arm(name: str, version: str, counts: ArmCounts, served: ArmServing) -> Arm:
    return Arm(name, version, counts, served, wilson_interval(counts.correct, counts.requests))


@dataclass(frozen=True)
class Report:
    trial: Trial
    production: Arm
    challenger: Arm
    decision: Decision
    predictions: int  # prediction lines read since the trial started
    feedback: int  # feedback lines read (a label sent twice counts twice here, once in the arms)
    unpaired: int  # shadow mode: labelled requests the challenger did not score (its queue was full)
    agreement: float | None  # shadow mode: share of shadowed requests where both models gave the same digit
    shadowed: int  # shadow mode: requests both models answered, labelled or not


def build_report(
    predictions: list[dict], feedback: list[dict], trial: Trial, plan: Plan, looks: int = 1,
    now: datetime | None = None,
) -> Report:  # fmt: skip
    """Join, count each arm per client, and decide. In shadow mode both arms are counted on the same
    labelled requests (those the challenger scored too), which is what makes the comparison paired."""
    lines = trial_lines(predictions, trial)
    joined = labelled_predictions(lines, latest_labels(feedback), trial)
    days = trial.days(now or datetime.now(timezone.utc))
    served = serving_of(lines)
    answered = [item for item in joined if item.arm == "production"]
    if trial.strategy == Strategy.shadow:
        paired = [item for item in answered if item.shadow_digit is not None]
        production = per_client(paired, [item.digit == item.label for item in paired])
        challenger = per_client(paired, [item.shadow_digit == item.label for item in paired])
        challenger_only = sum(item.shadow_digit == item.label != item.digit for item in paired)
        production_only = sum(item.digit == item.label != item.shadow_digit for item in paired)
        decision = decide_shadow(challenger_only, production_only, len(paired), days, plan, looks, served)
        unpaired = len(answered) - len(paired)
        agreement, shadowed = shadow_agreement(lines, trial)
    else:
        tried = [item for item in joined if item.arm == "challenger"]
        production = per_client(answered, [item.digit == item.label for item in answered])
        challenger = per_client(tried, [item.digit == item.label for item in tried])
        decision = decide_ab_test(production, challenger, days, plan, looks, served)
        unpaired, agreement, shadowed = 0, None, 0
    arms = (arm("production", trial.production_version, production, served[0]),
            arm("challenger", trial.challenger_version, challenger, served[1]))  # fmt: skip
    return Report(trial, *arms, decision, len(predictions), len(feedback), unpaired, agreement, shadowed)


def shadow_agreement(lines: Iterable[dict], trial: Trial) -> tuple[float | None, int]:
    """How often the challenger, in shadow, gave production's digit: on every shadowed request of the
    trial, labelled or not, so it needs no feedback at all. (rate, requests)."""
    same, total = 0, 0
    for line in lines:
        if line["arm"] != "production" or line.get("shadow_digit") is None:
            continue
        if str(line.get("shadow_version")) != trial.challenger_version:
            continue
        total += 1
        same += int(line["digit"]) == int(line["shadow_digit"])
    return (same / total if total else None), total


def summary(report: Report, plan: Plan) -> dict:
    """The report as values a person reads: the trial, the decision with its sequential bookkeeping (test,
    looks, alpha spent, boundary), per arm labelled requests, clients and requests served, the guardrails,
    and the rule in words; `arms` and `guardrails` are lists of table rows."""
    trial, decision, production, challenger = report.trial, report.decision, report.production, report.challenger
    metadata = {
        "decision": decision.verdict, "finding": decision.finding, "why": decision.reason,
        "rule": rule_text(trial.strategy, plan), "test": decision.test, "trial_id": trial.trial_id,
        "trial_started_at": trial.started_at.isoformat() if trial.started_at else "unknown",
        "looks": decision.looks, "information_fraction": round(decision.information_fraction, 4),
        "alpha": plan.alpha, "alpha_spent": _figure(decision.alpha_spent), "boundary_z": _figure(decision.boundary),
        "z": _figure(decision.statistic), "p_value": _figure(decision.p_value, "not computed (too few labels)"),
        "nominal_level": _figure(decision.nominal_level), "trial_over": decision.trial_over,
        "max_labelled": plan.max_labelled, "max_days": plan.max_days, "min_labelled_per_arm": plan.min_labelled_per_arm,
        "guardrail_breached": any(g.breached for g in decision.guardrails), "strategy": trial.strategy,
        "production_version": trial.production_version, "challenger_version": trial.challenger_version,
        "production_accuracy": _figure(production.accuracy), "challenger_accuracy": _figure(challenger.accuracy),
        "production_labelled": production.counts.requests, "challenger_labelled": challenger.counts.requests,
        "production_clients": production.counts.clients, "challenger_clients": challenger.counts.clients,
        "production_requests": production.served.requests, "challenger_requests": challenger.served.requests,
        "prediction_lines": report.predictions, "feedback_lines": report.feedback,
        "arms": [production.row(), challenger.row()], "guardrails": guardrail_rows(decision),
    }  # fmt: skip
    if trial.strategy == Strategy.shadow:
        metadata["agreement_rate"] = _figure(report.agreement)
        metadata["shadowed_requests"] = report.shadowed
        metadata["labelled_without_shadow"] = report.unpaired
    if report.predictions == 0 or report.feedback == 0:
        missing = "no predictions logged" if report.predictions == 0 else "no feedback sent"
        metadata["status"] = f"{missing} since the trial started: nothing to judge yet"
    return metadata


def guardrail_rows(decision: Decision) -> list[dict]:
    return [{"guardrail": g.name, "breached": g.breached, "detail": g.detail} for g in decision.guardrails]


def _figure(value: float | None, missing: str = "none yet") -> float | str:
    """Four significant figures; a word where there is no number (inf: no information yet)."""
    if value is None:
        return missing
    return "infinite (no information yet)" if math.isinf(value) else float(f"{value:.4g}")
