"""True labels for earlier predictions: `POST /feedback` `{"prediction_id": "...", "label": 7}`.

The server remembers the ids it issued (`IssuedPredictions`, with the arm and model version that
answered), so feedback is accepted only for a prediction this server made, and the feedback line says
which model it judges without a join. Lines go under `feedback/`, written off the request path by the
shared JSON-lines writer (`serving/jsonl.py`), one per accepted post:

    feedback/date=YYYY-MM-DD/<UTC time>-<host>-<pid>-<sequence>.jsonl
    {"time": ISO-8601 UTC, "prediction_id": 32 hex, "label": 0-9, "arm": "production" | "challenger",
     "model_version": str}

A client may correct itself: several lines for one id can exist, and the latest is the one to believe.

**Corrections become training data.** `land_feedback` joins the labels with the images the prediction log
kept and writes them as one labelled batch, `landing/feedback-<UTC time>-<hash>.npz` (arrays `images`
uint8 N x 28 x 28, `labels`, and `prediction_ids`; valid for `ml.data.read_labelled_batch`), which the
new-data sensor picks up like any other. Each prediction lands at most once: the ids landed, and those
whose image could not be found, are kept in `monitoring/feedback-landed.json`, and a batch the ledger
does not know yet (a run that died between the two writes) is read back into it before anything else.
A correction that arrives after its prediction landed is not landed again (counted as `late_corrections`).
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from typing import Any

from mnist_dagster.layout import FEEDBACK_BATCH_PREFIX, FEEDBACK_LANDED_KEY, FEEDBACK_PREFIX, LANDING_PREFIX, PREDICTION_LOG_PREFIX
from mnist_dagster.serving.jsonl import JsonLinesLog, read_json_lines
from mnist_dagster.scoring.preprocess import InputError
from mnist_dagster.serving.service import JSON_TYPE, json_object, media_type
from mnist_dagster.storage import Store

Label = tuple[str, str]  # (arm, model version) of an issued prediction; one shared tuple per pair


@dataclass(frozen=True, slots=True)
class FeedbackRecord:
    time: float
    prediction_id: str
    label: int
    arm: str
    model_version: str

    def line(self) -> dict[str, Any]:
        return {
            "prediction_id": self.prediction_id,
            "label": self.label,
            "arm": self.arm,
            "model_version": self.model_version,
        }


class FeedbackLog(JsonLinesLog):
    """The JSON-lines writer under `feedback/`, taking `FeedbackRecord`s."""

    def __init__(self, store: Store, prefix: str = FEEDBACK_PREFIX, flush_seconds: float = 5.0) -> None:
        super().__init__(store, prefix, flush_seconds)


def read_feedback(store: Store, prefix: str = FEEDBACK_PREFIX) -> list[dict]:
    """Every feedback line, oldest object first: what an evaluation of the arms reads."""
    return read_json_lines(store, prefix)


class IssuedPredictions:
    """The prediction ids this server issued, with their (arm, version), bounded in memory.

    Two generations of dicts rather than an LRU: adding is one dict store, and when the newer generation
    holds `capacity // 2` ids the older one is dropped whole. So the newest `capacity // 2` ids are always
    remembered, at most `capacity` are held (about 110 MB for 1,000,000), and nothing is ever scanned. The
    price: dropping a generation frees 500,000 ids at once, a pause of about 20 ms on a slow core, once per
    500,000 predictions.
    Used from the event loop only (the batch route records its ids back on the loop).
    """

    def __init__(self, capacity: int = 1_000_000) -> None:
        self.generation_size = max(1, capacity // 2)
        self._newer: dict[str, Label] = {}
        self._older: dict[str, Label] = {}

    def add(self, prediction_id: str, label: Label) -> None:
        if len(self._newer) >= self.generation_size:
            self._older, self._newer = self._newer, {}
        self._newer[prediction_id] = label

    def get(self, prediction_id: str) -> Label | None:
        return self._newer.get(prediction_id) or self._older.get(prediction_id)

    def __len__(self) -> int:
        return len(self._newer) + len(self._older)


def parse_feedback(body: bytes, content_type: str | None) -> tuple[str, int]:
    """`{"prediction_id": str, "label": 0-9}` -> (id, label); raises `InputError` (400 bad JSON, 415, 422)."""
    if media_type(content_type) != JSON_TYPE:
        raise InputError(f"unsupported content type {content_type or '(none)'!r}: send application/json", 415)
    if not body:
        raise InputError('empty body: send JSON {"prediction_id": "...", "label": 0-9}', 400)
    document = json_object(body, allowed={"prediction_id", "label"})
    missing = sorted({"prediction_id", "label"} - document.keys())
    if missing:
        raise InputError(f'missing field(s) {missing}: send {{"prediction_id": "...", "label": 0-9}}')
    prediction_id, label = document["prediction_id"], document["label"]
    if not isinstance(prediction_id, str):
        raise InputError("'prediction_id' must be the string a prediction answered with")
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label <= 9:
        raise InputError(f"'label' must be an integer digit 0-9 (got {label!r:.20})")
    return prediction_id, label


# ----- corrections become training data ------------------------------------------------------------



def latest_labels(feedback: Iterable[dict]) -> dict[str, int]:
    """prediction_id -> the label sent last for it: a client may correct itself, and a label sent twice
    counts once. Ordered by each line's time; lines of the same time keep the log's order."""
    ordered = sorted(feedback, key=lambda line: datetime.fromisoformat(line["time"]))
    return {line["prediction_id"]: int(line["label"]) for line in ordered}


@dataclass
class FeedbackLedger:
    """What `land_feedback` already handled: the label each landed id went with, the batches written, and
    the ids whose image was not found (never landed, never retried)."""

    landed: dict[str, int]
    batches: list[str]
    unmatched: list[str]

    def handled(self) -> set[str]:
        return set(self.landed) | set(self.unmatched)

    def to_bytes(self) -> bytes:
        state = {"landed": self.landed, "batches": sorted(set(self.batches)), "unmatched": sorted(set(self.unmatched))}
        return json.dumps(state).encode()


def read_ledger(store: Store) -> FeedbackLedger:
    """The ledger, plus any feedback batch in `landing/` it does not name yet (read back from its arrays)."""
    import numpy as np

    state = json.loads(store.read_bytes(FEEDBACK_LANDED_KEY)) if store.exists(FEEDBACK_LANDED_KEY) else {}
    ledger = FeedbackLedger(dict(state.get("landed", {})), list(state.get("batches", [])), list(state.get("unmatched", [])))
    for item in store.list(LANDING_PREFIX):
        if item.key.startswith(FEEDBACK_BATCH_PREFIX) and item.key.endswith(".npz") and item.key not in ledger.batches:
            with np.load(io.BytesIO(store.read_bytes(item.key)), allow_pickle=False) as npz:
                ledger.landed.update(zip((str(p) for p in npz["prediction_ids"]), npz["labels"].tolist()))
            ledger.batches.append(item.key)
    return ledger


def pending_labels(latest: dict[str, int], ledger: FeedbackLedger) -> dict[str, int]:
    """The latest label of every prediction with feedback that has not been handled yet."""
    handled = ledger.handled()
    return {pid: label for pid, label in latest.items() if pid not in handled}


def count_pending(store: Store) -> dict[str, int]:
    """What the sensor asks each tick: the new labels not landed yet (reads the feedback log and the ledger)."""
    return pending_labels(latest_labels(read_feedback(store)), read_ledger(store))


@dataclass(frozen=True)
class LandingResult:
    key: str | None  # the batch written, or None
    landed: int
    unmatched: int  # feedback whose prediction's image was not found in the log window: never landed
    pending: int  # new labels seen, before the join
    late_corrections: int  # labels changed after their prediction had landed: not landed again

    def summary(self) -> str:
        if self.key is None:
            return f"{self.pending} new label(s), fewer than min_feedback: nothing landed"
        return f"landed {self.landed} labelled image(s) as {self.key} ({self.unmatched} without a logged image)"


def land_feedback(store: Store, min_feedback: int = 100, max_age_days: int = 30) -> LandingResult:
    """Writes the new labels, with their logged images, as one batch in `landing/` when at least
    `min_feedback` exist; then the ledger. Only the prediction log's days from `max_age_days` before the
    earliest new feedback are searched (the server accepts feedback only for recent predictions anyway)."""
    import numpy as np

    from mnist_dagster.serving.prediction_log import logged_image

    lines = read_feedback(store)
    latest, ledger = latest_labels(lines), read_ledger(store)
    late = sum(1 for pid, label in ledger.landed.items() if pid in latest and latest[pid] != label)
    pending = pending_labels(latest, ledger)
    if len(pending) < max(1, min_feedback):
        return LandingResult(None, 0, 0, len(pending), late)
    earliest = min(datetime.fromisoformat(line["time"]) for line in lines if line["prediction_id"] in pending)
    images = _logged_images(store, set(pending), earliest.date() - timedelta(days=max_age_days))
    found = sorted(pid for pid in pending if pid in images)
    unmatched = sorted(set(pending) - set(found))
    key = None
    if found:
        key = f"{FEEDBACK_BATCH_PREFIX}{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}-{_digest(found)}.npz"
        buffer = io.BytesIO()
        np.savez_compressed(
            buffer,
            images=np.stack([logged_image(images[pid]) for pid in found]),
            labels=np.array([pending[pid] for pid in found], dtype=np.int64),
            prediction_ids=np.array(found),
        )
        store.write_bytes(key, buffer.getvalue())  # the batch first: the ledger is rebuilt from it if we die here
        ledger.landed.update({pid: pending[pid] for pid in found})
        ledger.batches.append(key)
    ledger.unmatched.extend(unmatched)
    store.write_bytes(FEEDBACK_LANDED_KEY, ledger.to_bytes())
    return LandingResult(key, len(found), len(unmatched), len(pending), late)


def _logged_images(store: Store, wanted: set[str], since: date) -> dict[str, str]:
    """prediction id -> its logged `image` (base64), for the wanted ids, from the log's days since `since`."""
    found: dict[str, str] = {}
    for item in store.list(PREDICTION_LOG_PREFIX):
        day = item.key.split("date=", 1)[-1][:10]
        if not item.key.endswith(".jsonl") or (day[:4].isdigit() and date.fromisoformat(day) < since):
            continue
        for raw in store.read_bytes(item.key).splitlines():
            if raw.strip() and (line := json.loads(raw))["prediction_id"] in wanted and "image" in line:
                found[line["prediction_id"]] = line["image"]
    return found


def _digest(ids: list[str]) -> str:
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()[:10]
