"""Feedback -> `landing/`: which labels become training data, and which are held back as likely poisoning.

Labels sent to `POST /feedback` are joined with the images the prediction log kept and written as one
labelled batch, `landing/feedback-<UTC time>-<hash>.npz` (arrays `images` uint8 N x 28 x 28, `labels`,
`prediction_ids`; valid for `ml.data.read_labelled_batch`), which the new-data sensor picks up like any
other: so a flood of wrong labels would reach retraining with only the gate in its way. Before landing,
the batch's labels are grouped by the client that sent them (`client` in the feedback line, see
`serving/guards.py`) and two rules quarantine a client's labels:

1. **Share.** A client sending more than `max_share` (default 0.2) of the batch. Judged only once the
   batch has `min_clients_for_share` (default 10) clients: with fewer, a fair share is itself large.
2. **Disagreement.** A client that disagrees with the model that answered (label != the digit it predicted)
   far more often than the other clients do. The test: one-sided Fisher exact test
   (`scipy.stats.fisher_exact`, alternative "greater") of the client's 2x2 table (disagree, agree) against
   the pooled table of the other clients not quarantined; quarantined when p < alpha / k (Bonferroni over
   the k clients tested; alpha 0.001) AND its rate exceeds theirs by at least `min_excess` (0.10: with
   thousands of labels a harmless difference is significant too). A client is tested once it has
   `min_labels` (30) labels, against at least `min_peer_labels` (30) of others; the worst client is
   quarantined first and the rest are tested again without it, so two poisoners do not hide each other.
   A client with enough labels but too few peers to compare with is *held*: its labels stay pending
   until others' arrive (`min_peer_labels=0` lands them untested, for a deployment with one client).

The test assumes most clients are honest: the others' pooled rate is the baseline. It cannot tell a
client that reports only the model's mistakes from a poisoner; that is why quarantined labels are kept,
not dropped: `quarantine/feedback-<UTC time>-<hash>.npz` (the same arrays plus `clients`, `predicted`,
`reasons`). Moving such a file to `landing/` releases it (the ledger then counts it as landed).

Each prediction is handled at most once: the ids landed, quarantined, and those whose image could not be
found are kept in `monitoring/feedback-landed.json`, and a batch the ledger does not know yet (a run that
died between the writes) is read back into it before anything else. A correction that arrives after its
prediction was handled is not landed again (counted as `late_corrections`).
"""

from __future__ import annotations

import hashlib
import io
import json
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from datetime import date, datetime, timedelta, timezone

import numpy as np
from scipy.stats import fisher_exact

from mnist_dagster.layout import (
    FEEDBACK_BATCH_PREFIX,
    FEEDBACK_LANDED_KEY,
    PREDICTION_LOG_PREFIX,
    QUARANTINE_BATCH_PREFIX,
)
from mnist_dagster.serving.feedback import latest_lines, read_feedback
from mnist_dagster.serving.prediction_log import logged_image
from mnist_dagster.storage import Store

UNKNOWN_CLIENT = "unknown"  # feedback lines written before clients were recorded
SHARE, DISAGREEMENT, HELD = "share", "disagreement", "held"
TEST_NAME = "one-sided Fisher exact test (scipy.stats.fisher_exact, alternative='greater')"

# ----- the selection (no store) ----------------------------------------------------------------------


@dataclass(frozen=True)
class Label:
    """One prediction's label as it would land: who sent it, and what the model that answered said."""

    prediction_id: str
    label: int
    client: str
    predicted: int


@dataclass(frozen=True)
class GuardRules:
    """When a client's labels are quarantined (see the module's docstring for why each default)."""

    max_share: float = 0.2
    min_clients_for_share: int = 10
    alpha: float = 0.001
    min_excess: float = 0.10
    min_labels: int = 30
    min_peer_labels: int = 30

    def test_statement(self) -> str:
        """The disagreement rule in words, for metadata a person reads."""
        return (
            f"{TEST_NAME} of a client's disagreement rate (label != the answering model's digit) against the pooled "
            f"rate of the other unquarantined clients; quarantined when p < {self.alpha:g}/k (Bonferroni, k = "
            f"clients tested) and the rate is at least {self.min_excess:g} above theirs; tested from "
            f"{self.min_labels} labels against >= {self.min_peer_labels} peer labels. Share rule: more than "
            f"{self.max_share:g} of the batch, once it has >= {self.min_clients_for_share} clients."
        )


@dataclass
class ClientVerdict:
    """What was found about one client's labels in a batch; `reason` None: they land."""

    client: str
    labels: int
    disagreements: int
    share: float
    peer_labels: int = 0
    peer_disagreements: int = 0
    p_value: float | None = None  # None: not tested (too few labels or peers, or quarantined for its share)
    reason: str | None = None  # "share" | "disagreement" | "held" | None

    @property
    def rate(self) -> float:
        return self.disagreements / self.labels if self.labels else 0.0

    @property
    def peer_rate(self) -> float | None:
        return self.peer_disagreements / self.peer_labels if self.peer_labels else None

    def row(self) -> dict[str, object]:
        peer_rate = self.peer_rate
        return {
            "client": self.client, "labels": self.labels, "share": round(self.share, 4),
            "disagreement": round(self.rate, 4), "others": None if peer_rate is None else round(peer_rate, 4),
            "p_value": None if self.p_value is None else float(f"{self.p_value:.3g}"),
            "verdict": self.reason or "lands",
        }  # fmt: skip


@dataclass
class Selection:
    land: list[Label] = field(default_factory=list)
    quarantine: list[Label] = field(default_factory=list)
    held: list[Label] = field(default_factory=list)
    verdicts: list[ClientVerdict] = field(default_factory=list)
    level: float = 0.0  # the per-client level of the disagreement test, alpha / k

    def quarantined_clients(self) -> list[ClientVerdict]:
        return [v for v in self.verdicts if v.reason in (SHARE, DISAGREEMENT)]


def select(labels: list[Label], rules: GuardRules = GuardRules()) -> Selection:
    """Splits a batch's labels into those that land, those quarantined, and those held (see the docstring)."""
    by_client: dict[str, list[Label]] = defaultdict(list)
    for label in labels:
        by_client[label.client].append(label)
    verdicts = {
        client: ClientVerdict(client, len(own), sum(x.label != x.predicted for x in own), len(own) / len(labels))
        for client, own in by_client.items()
    }
    if len(verdicts) >= rules.min_clients_for_share:
        for verdict in verdicts.values():
            if verdict.share > rules.max_share:
                verdict.reason = SHARE
    tested = [v for v in verdicts.values() if v.reason is None and v.labels >= max(1, rules.min_labels)]
    level = rules.alpha / max(1, len(tested))
    _quarantine_disagreeing(list(verdicts.values()), tested, level, rules)
    selection = Selection(verdicts=sorted(verdicts.values(), key=lambda v: -v.labels), level=level)
    for client, own in by_client.items():
        reason = verdicts[client].reason
        bucket = selection.land if reason is None else selection.held if reason == HELD else selection.quarantine
        bucket.extend(own)
    return selection


def _quarantine_disagreeing(
    everyone: list[ClientVerdict], tested: list[ClientVerdict], level: float, rules: GuardRules
) -> None:
    """Step by step: test each remaining client against the others not quarantined; quarantine the one with the
    smallest p-value if it passes the rule; repeat until none does. Then mark the untestable ones held."""
    while True:
        worst: ClientVerdict | None = None
        for verdict in (v for v in tested if v.reason is None):
            _test_against_peers(verdict, everyone, rules)
            if verdict.p_value is not None and verdict.p_value < level:
                excess = verdict.rate - (verdict.peer_rate or 0.0)
                if excess >= rules.min_excess and (worst is None or verdict.p_value < worst.p_value):
                    worst = verdict
        if worst is None:
            break
        worst.reason = DISAGREEMENT
    for verdict in tested:
        if verdict.reason is None and verdict.peer_labels < rules.min_peer_labels:
            verdict.reason = HELD


def _test_against_peers(verdict: ClientVerdict, everyone: list[ClientVerdict], rules: GuardRules) -> None:
    peers = [v for v in everyone if v is not verdict and v.reason is None]
    verdict.peer_labels = sum(v.labels for v in peers)
    verdict.peer_disagreements = sum(v.disagreements for v in peers)
    verdict.p_value = None
    if verdict.peer_labels >= max(1, rules.min_peer_labels):
        table = [
            [verdict.disagreements, verdict.labels - verdict.disagreements],
            [verdict.peer_disagreements, verdict.peer_labels - verdict.peer_disagreements],
        ]
        verdict.p_value = float(fisher_exact(table, alternative="greater").pvalue)


# ----- the ledger of what was handled ------------------------------------------------------------------


@dataclass
class FeedbackLedger:
    """What `land_feedback` already handled: the label each landed or quarantined id went with, the batches
    written, and the ids whose image was not found (never landed, never retried)."""

    landed: dict[str, int]
    batches: list[str]
    unmatched: list[str]
    quarantined: dict[str, int] = field(default_factory=dict)

    def handled(self) -> set[str]:
        return set(self.landed) | set(self.unmatched) | set(self.quarantined)

    def to_bytes(self) -> bytes:
        state = {
            "landed": self.landed, "quarantined": self.quarantined,
            "batches": sorted(set(self.batches)), "unmatched": sorted(set(self.unmatched)),
        }  # fmt: skip
        return json.dumps(state).encode()


def read_ledger(store: Store) -> FeedbackLedger:
    """The ledger, plus any feedback batch in `landing/` or `quarantine/` it does not name yet (read back from
    its arrays). A quarantined batch moved to `landing/` by a person counts as landed from then on."""
    state = json.loads(store.read_bytes(FEEDBACK_LANDED_KEY)) if store.exists(FEEDBACK_LANDED_KEY) else {}
    ledger = FeedbackLedger(
        dict(state.get("landed", {})), list(state.get("batches", [])), list(state.get("unmatched", [])),
        dict(state.get("quarantined", {})),
    )  # fmt: skip
    for prefix, into in ((FEEDBACK_BATCH_PREFIX, ledger.landed), (QUARANTINE_BATCH_PREFIX, ledger.quarantined)):
        for item in store.list(prefix.rsplit("/", 1)[0]):
            if item.key.startswith(prefix) and item.key.endswith(".npz") and item.key not in ledger.batches:
                with np.load(io.BytesIO(store.read_bytes(item.key)), allow_pickle=False) as npz:
                    into.update(zip((str(p) for p in npz["prediction_ids"]), npz["labels"].tolist()))
                ledger.batches.append(item.key)
    return ledger


def pending_lines(store: Store, ledger: FeedbackLedger) -> tuple[dict[str, dict], int]:
    """The latest feedback line of every prediction not handled yet, and how many handled ones were corrected
    since (late corrections: a prediction lands once)."""
    latest = latest_lines(read_feedback(store))
    handled = {**ledger.landed, **ledger.quarantined}
    late = sum(1 for pid, label in handled.items() if pid in latest and int(latest[pid]["label"]) != label)
    unhandled = ledger.handled()
    return {pid: line for pid, line in latest.items() if pid not in unhandled}, late


def count_pending(store: Store) -> dict[str, int]:
    """What the sensor asks each tick: the new labels not handled yet (reads the feedback log and the ledger)."""
    pending, _ = pending_lines(store, read_ledger(store))
    return {pid: int(line["label"]) for pid, line in pending.items()}


# ----- landing --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LandingResult:
    key: str | None  # the batch written to landing/, or None
    landed: int
    unmatched: int  # feedback whose prediction's image was not found in the log window: never landed
    pending: int  # new labels seen, before the join
    late_corrections: int  # labels changed after their prediction had been handled: not landed again
    quarantine_key: str | None = None
    quarantined: int = 0
    held: int = 0  # labels of clients too few others' labels could be compared with: still pending
    selection: Selection | None = None

    def summary(self) -> str:
        if self.selection is None:
            return f"{self.pending} new label(s), fewer than min_feedback: nothing landed"
        batch = self.key or "no batch"
        text = f"landed {self.landed} labelled image(s) as {batch} ({self.unmatched} without a logged image)"
        if self.quarantined:
            who = ", ".join(f"{v.client} ({v.labels}, {v.reason})" for v in self.selection.quarantined_clients())
            text += f"; quarantined {self.quarantined} label(s) from {who} as {self.quarantine_key}"
        if self.held:
            text += f"; held {self.held} label(s) back until other clients' labels can be compared with them"
        return text


def land_feedback(
    store: Store, min_feedback: int = 100, max_age_days: int = 30, rules: GuardRules = GuardRules()
) -> LandingResult:
    """Writes the new labels, with their logged images, as one batch in `landing/` (and what looks like poisoning
    to `quarantine/`) when at least `min_feedback` exist; then the ledger. Only the prediction log's days from
    `max_age_days` before the earliest new feedback are searched (feedback is taken for recent predictions)."""
    ledger = read_ledger(store)
    pending, late = pending_lines(store, ledger)
    if len(pending) < max(1, min_feedback):
        return LandingResult(None, 0, 0, len(pending), late)
    earliest = min(datetime.fromisoformat(line["time"]) for line in pending.values())
    logged = _logged_predictions(store, set(pending), earliest.date() - timedelta(days=max_age_days))
    labels = [
        Label(pid, int(line["label"]), str(line.get("client") or UNKNOWN_CLIENT), int(logged[pid]["digit"]))
        for pid, line in sorted(pending.items())
        if pid in logged
    ]
    unmatched = sorted(set(pending) - set(logged))
    selection = select(labels, rules) if labels else Selection()
    key = _write_batch(store, FEEDBACK_BATCH_PREFIX, selection.land, logged)  # before the ledger: see read_ledger
    quarantine_key = _write_batch(store, QUARANTINE_BATCH_PREFIX, selection.quarantine, logged, selection)
    ledger.landed.update({x.prediction_id: x.label for x in selection.land})
    ledger.quarantined.update({x.prediction_id: x.label for x in selection.quarantine})
    ledger.batches += [k for k in (key, quarantine_key) if k]
    ledger.unmatched.extend(unmatched)
    store.write_bytes(FEEDBACK_LANDED_KEY, ledger.to_bytes())
    return LandingResult(
        key, len(selection.land), len(unmatched), len(pending), late,
        quarantine_key, len(selection.quarantine), len(selection.held), selection,
    )  # fmt: skip


def _write_batch(
    store: Store, prefix: str, labels: list[Label], logged: dict[str, dict], selection: Selection | None = None
) -> str | None:
    """One `.npz` of `labels` with their logged images under `prefix`; with `selection`, also who sent each label,
    what the model said and why it was quarantined. None when there is nothing to write."""
    if not labels:
        return None
    ids = [x.prediction_id for x in labels]
    arrays = {
        "images": np.stack([logged_image(logged[pid]["image"]) for pid in ids]),
        "labels": np.array([x.label for x in labels], dtype=np.int64),
        "prediction_ids": np.array(ids),
    }
    if selection is not None:
        reasons = {v.client: v.reason for v in selection.verdicts}
        arrays |= {
            "clients": np.array([x.client for x in labels]),
            "predicted": np.array([x.predicted for x in labels], dtype=np.int64),
            "reasons": np.array([reasons[x.client] for x in labels]),
        }
    key = f"{prefix}{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}-{_digest(ids)}.npz"
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    store.write_bytes(key, buffer.getvalue())
    return key


def _logged_predictions(store: Store, wanted: set[str], since: date) -> dict[str, dict]:
    """prediction id -> its logged `image` (base64) and `digit`, for the wanted ids, from the log's days since
    `since`; lines without an image are not kept (nothing to train on)."""
    found: dict[str, dict] = {}
    for item in store.list(PREDICTION_LOG_PREFIX):
        day = item.key.split("date=", 1)[-1][:10]
        if not item.key.endswith(".jsonl") or (day[:4].isdigit() and date.fromisoformat(day) < since):
            continue
        for raw in store.read_bytes(item.key).splitlines():
            if raw.strip() and (line := json.loads(raw))["prediction_id"] in wanted and "image" in line:
                found[line["prediction_id"]] = {"image": line["image"], "digit": line["digit"]}
    return found


def _digest(ids: list[str]) -> str:
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()[:10]


def verdict_rows(selection: Selection) -> list[dict[str, object]]:
    """One row per client of the batch, largest first: for the op's metadata table."""
    return [v.row() for v in selection.verdicts]


def rules_metadata(rules: GuardRules, selection: Selection | None) -> dict[str, object]:
    """The rules in force, the test's name and the level it was run at this time."""
    level = selection.level if selection is not None else None
    return {**asdict(rules), "test": TEST_NAME, "per_client_level": level, "rule": rules.test_statement()}
