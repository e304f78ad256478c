"""True labels for earlier predictions: `POST /feedback` `{"prediction_id": "...", "label": 7}`.

The server remembers the ids it issued (`IssuedPredictions`, with the arm and model version that
answered), so feedback is accepted only for a prediction this server made, and the feedback line says
which model it judges without a join. Lines go under `feedback/`, written off the request path by the
shared JSON-lines writer (`serving/jsonl.py`), one per accepted post:

    feedback/date=YYYY-MM-DD/<UTC time>-<host>-<pid>-<sequence>.jsonl
    {"time": ISO-8601 UTC, "prediction_id": 32 hex, "label": 0-9, "arm": "production" | "challenger",
     "model_version": str, "client": "key:<X-Client-Key>" | "addr:<peer address>"}

A client may correct itself: several lines for one id can exist, and the latest is the one to believe.

**Corrections become training data** through `lifecycle/landing.py` (feedback -> `landing/`), which groups the
labels by `client` (who sent them, as `serving/guards.py` names it: `key:<X-Client-Key>` or `addr:<peer>`)
and holds back what looks like poisoning.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from mnist_dagster.layout import FEEDBACK_PREFIX
from mnist_dagster.serving.jsonl import JsonLinesLog, read_json_lines
from mnist_dagster.storage import Store

Label = tuple[str, str]  # (arm, model version) of an issued prediction; one shared tuple per pair


@dataclass(frozen=True, slots=True)
class FeedbackRecord:
    time: float
    prediction_id: str
    label: int
    arm: str
    model_version: str
    client: str | None = None  # who sent it (serving/guards.py's `client_of`); None in lines from before

    def line(self) -> dict[str, Any]:
        line = {
            "prediction_id": self.prediction_id,
            "label": self.label,
            "arm": self.arm,
            "model_version": self.model_version,
        }
        if self.client is not None:
            line["client"] = self.client
        return line


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


# ----- the latest label of each prediction -----------------------------------------------------------


def latest_lines(feedback: Iterable[dict]) -> dict[str, dict]:
    """prediction_id -> the feedback line sent last for it: a client may correct itself, and a label sent twice
    counts once. Ordered by each line's time; lines of the same time keep the log's order."""
    ordered = sorted(feedback, key=lambda line: datetime.fromisoformat(line["time"]))
    return {line["prediction_id"]: line for line in ordered}


def latest_labels(feedback: Iterable[dict]) -> dict[str, int]:
    """prediction_id -> the label sent last for it (see `latest_lines`)."""
    return {prediction_id: int(line["label"]) for prediction_id, line in latest_lines(feedback).items()}
