"""Champion vs challenger on live traffic: join what the endpoint answered with the labels clients sent
back, and decide whether the challenger should replace production.

Dagster-free, so the decision can be read and tested on its own; `ab_test_report` runs it and shows it.

    prediction_log/  {"prediction_id", "arm", "model_version", "digit", ["shadow_digit", "shadow_version"], ...}
    feedback/        {"time", "prediction_id", "label", ...}   several for one id: the latest is believed

Only the current trial counts: lines of the production version answered by production, and lines of the
challenger version answered by the challenger (or, in shadow mode, scored by it beside production). Lines
of older versions, from earlier trials, are ignored.

The rule (`rule_text` says it in words): `need_more_data` while either arm has fewer than
`min_labelled` labelled predictions; then `promote` when the challenger is more accurate and the test's
p-value is below `alpha`; `keep` otherwise. The test fits how the traffic was split: in an A/B test the
arms answered different requests, so a two-proportion z-test; in shadow mode both models judged the same
requests, so McNemar's exact test on the requests only one of them got right (paired, far more sensitive).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from typing import Literal

from mnist_dagster.layout import FEEDBACK_PREFIX, PREDICTION_LOG_PREFIX
from mnist_dagster.lifecycle.record import read_record
from mnist_dagster.serving.feedback import latest_labels
from mnist_dagster.serving.jsonl import read_json_lines
from mnist_dagster.storage import Store

Verdict = Literal["promote", "keep", "need_more_data"]
TWO_PROPORTIONS = "two-sided two-proportion z-test (the arms answered different requests)"
MCNEMAR = "McNemar's exact test (both models judged the same requests; only those one of them got right count)"


@dataclass(frozen=True)
class Trial:
    """The challenger on trial beside production, and how traffic is split between them."""

    strategy: str  # "ab_test" | "shadow"
    production_version: str
    challenger_version: str
    started: date | None  # the UTC day the challenger was deployed: no line of this trial is older
    trial_id: str | None = None
    started_at: datetime | None = None  # when the deployment record put the challenger on trial


def current_trial(store: Store) -> Trial | None:
    """The trial running now (from the deployment record), or None when production serves alone."""
    record = read_record(store)
    if record.challenger is None or record.production is None:
        return None
    started_at = datetime.fromisoformat(record.trial_started_at) if record.trial_started_at else None
    started = started_at.astimezone(timezone.utc).date() if started_at else None
    return Trial(str(record.strategy), record.production, record.challenger, started, record.trial_id, started_at)


def read_trial_logs(store: Store, trial: Trial, today: date | None = None) -> tuple[list[dict], list[dict]]:
    """(prediction lines, feedback lines) from the day the trial started on: the log's older days, which
    grow by every request ever served, are not even listed."""
    if trial.started is None:
        return read_json_lines(store, PREDICTION_LOG_PREFIX), read_json_lines(store, FEEDBACK_PREFIX)
    last = (today or datetime.now(timezone.utc).date()) + timedelta(days=1)  # a writer's clock a little ahead
    days = [trial.started + timedelta(days=offset) for offset in range((last - trial.started).days + 1)]

    def lines(prefix: str) -> list[dict]:
        return [line for day in days for line in read_json_lines(store, f"{prefix}/date={day.isoformat()}")]

    return lines(PREDICTION_LOG_PREFIX), lines(FEEDBACK_PREFIX)


@dataclass(frozen=True)
class Labelled:
    """One prediction of the trial a client labelled: what each model said and the truth."""

    arm: str  # "production" | "challenger": which model answered
    digit: int
    label: int
    shadow_digit: int | None = None  # shadow mode: the challenger's answer to the same request


def labelled_predictions(predictions: Iterable[dict], labels: dict[str, int], trial: Trial) -> list[Labelled]:
    """The trial's predictions that have a label, once each; other versions' lines are left out."""
    arm_versions = {"production": trial.production_version, "challenger": trial.challenger_version}
    joined, seen = [], set()
    for line in predictions:
        prediction_id = line["prediction_id"]
        if prediction_id in seen or prediction_id not in labels:
            continue
        if arm_versions.get(line["arm"]) != str(line["model_version"]):
            continue
        seen.add(prediction_id)
        shadowed = line.get("shadow_digit") is not None and str(line.get("shadow_version")) == trial.challenger_version
        shadow_digit = int(line["shadow_digit"]) if shadowed else None
        joined.append(Labelled(line["arm"], int(line["digit"]), labels[prediction_id], shadow_digit))
    return joined


@dataclass(frozen=True)
class Arm:
    """One model's record on labelled live traffic, with a 95% Wilson interval for its accuracy."""

    name: str
    version: str
    n: int
    correct: int
    interval: tuple[float, float]

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.n if self.n else None

    def row(self) -> dict:
        """The arm as a table row a person reads."""
        accuracy = "n/a" if self.accuracy is None else round(self.accuracy, 4)
        return {
            "arm": self.name, "model_version": self.version, "labelled": self.n, "correct": self.correct,
            "accuracy": accuracy, "ci95_low": round(self.interval[0], 4), "ci95_high": round(self.interval[1], 4),
        }  # fmt: skip


def arm(name: str, version: str, right: list[bool]) -> Arm:
    from mnist_dagster.ml.compare import wilson_interval

    correct = sum(right)
    return Arm(name, version, len(right), correct, wilson_interval(correct, len(right)))


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    finding: str  # challenger better | no significant difference | challenger significantly worse | too few labels
    why: str  # the numbers behind it, in words
    test: str
    p_value: float | None


def rule_text(strategy: str, min_labelled: int, alpha: float) -> str:
    """The decision rule in words, for the report's metadata and the Slack message."""
    test = MCNEMAR if strategy == "shadow" else TWO_PROPORTIONS
    return (
        f"need_more_data while either arm has fewer than {min_labelled} labelled predictions; then promote when "
        f"the challenger is more accurate and the {test} gives p < {alpha}; otherwise keep production (no "
        "significant difference, or the challenger significantly worse)"
    )


def decide(
    strategy: str, production: Arm, challenger: Arm, paired: list[Labelled], min_labelled: int, alpha: float
) -> Decision:
    """Apply the rule; `paired` (shadow mode) are the labelled requests both models answered."""
    test = MCNEMAR if strategy == "shadow" else TWO_PROPORTIONS
    short = [a for a in (production, challenger) if a.n < min_labelled]
    if short:
        counts = ", ".join(f"{a.name} has {a.n}" for a in short)
        why = f"{counts} of the {min_labelled} labelled predictions needed per arm"
        return Decision("need_more_data", "too few labels", why, test, None)
    if strategy == "shadow":
        p_value, better, worse = _mcnemar(paired)
    else:
        p_value, better, worse = _two_proportions(production, challenger)
    numbers = (
        f"challenger {_percent(challenger)} against production {_percent(production)}; "
        f"{test.split(' (')[0]} p = {p_value:.3g}"  # the test's name, without why it fits
    )
    if better and p_value < alpha:
        return Decision("promote", "challenger better", f"{numbers} < alpha {alpha}", test, p_value)
    if worse and p_value < alpha:
        return Decision("keep", "challenger significantly worse", f"{numbers} < alpha {alpha}", test, p_value)
    return Decision("keep", "no significant difference", f"{numbers}, not below alpha {alpha}", test, p_value)


def _two_proportions(production: Arm, challenger: Arm) -> tuple[float, bool, bool]:
    from mnist_dagster.ml.compare import two_proportion_test

    result = two_proportion_test(production.correct, production.n, challenger.correct, challenger.n)
    return result.p_value, result.difference > 0, result.difference < 0


def _mcnemar(paired: list[Labelled]) -> tuple[float, bool, bool]:
    import numpy as np

    from mnist_dagster.ml.compare import mcnemar_exact

    labels = np.array([item.label for item in paired])
    challenger = np.array([item.shadow_digit for item in paired])
    result = mcnemar_exact(labels, challenger, np.array([item.digit for item in paired]))
    return result.p_value, result.candidate_only > result.production_only, result.candidate_is_worse


def _percent(a: Arm) -> str:
    return f"{100 * a.accuracy:.2f}% (n={a.n})" if a.accuracy is not None else f"no labels (n={a.n})"


@dataclass(frozen=True)
class Report:
    trial: Trial
    production: Arm
    challenger: Arm
    decision: Decision
    predictions: int  # prediction lines read for the trial's days
    feedback: int  # feedback lines read (a label sent twice counts twice here, once in the arms)
    unpaired: int  # shadow mode: labelled requests the challenger did not score (its queue was full)
    agreement: float | None  # shadow mode: share of shadowed requests where both models gave the same digit
    shadowed: int  # shadow mode: requests both models answered, labelled or not


def build_report(
    predictions: list[dict], feedback: list[dict], trial: Trial, min_labelled: int, alpha: float
) -> Report:
    """Join, count each arm, and decide. In shadow mode both arms are counted on the same labelled requests
    (those the challenger scored too), which is what makes the comparison paired."""
    joined = labelled_predictions(predictions, latest_labels(feedback), trial)
    answered = [item for item in joined if item.arm == "production"]
    if trial.strategy == "shadow":
        paired = [item for item in answered if item.shadow_digit is not None]
        production = arm("production", trial.production_version, [item.digit == item.label for item in paired])
        challenger = arm("challenger", trial.challenger_version, [item.shadow_digit == item.label for item in paired])
        unpaired = len(answered) - len(paired)
        agreement, shadowed = shadow_agreement(predictions, trial)
    else:
        paired, unpaired, agreement, shadowed = [], 0, None, 0
        production = arm("production", trial.production_version, [item.digit == item.label for item in answered])
        tried = [item.digit == item.label for item in joined if item.arm == "challenger"]
        challenger = arm("challenger", trial.challenger_version, tried)
    decision = decide(trial.strategy, production, challenger, paired, min_labelled, alpha)
    counts = len(predictions), len(feedback), unpaired, agreement, shadowed
    return Report(trial, production, challenger, decision, *counts)


def shadow_agreement(predictions: Iterable[dict], trial: Trial) -> tuple[float | None, int]:
    """How often the challenger, in shadow, gave production's digit: on every shadowed request of the
    trial, labelled or not, so it needs no feedback at all. (rate, requests)."""
    same, total, seen = 0, 0, set()
    for line in predictions:
        versions = (str(line["model_version"]), str(line.get("shadow_version")))
        if line["prediction_id"] in seen or line["arm"] != "production" or line.get("shadow_digit") is None:
            continue
        if versions != (trial.production_version, trial.challenger_version):
            continue
        seen.add(line["prediction_id"])
        total += 1
        same += int(line["digit"]) == int(line["shadow_digit"])
    return (same / total if total else None), total
