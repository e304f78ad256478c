"""True labels for earlier predictions: `POST /feedback` `{"prediction_id": "...", "label": 7}`.

A prediction id proves itself (`serving/ids.py`: signed, carrying the arm, model version and time), so any
replica accepts feedback for a prediction any replica made, and the feedback line says which model it judges
without a join. Each accepted post is journaled before the 202 leaves (`storage/jsonl.py`) and shipped under
`feedback/`:

    feedback/date=YYYY-MM-DD/<UTC time sealed>-<host>-<pid>-<start>-<sequence>.jsonl
    {"time": ISO-8601 UTC, "prediction_id": str, "label": 0-9, "arm": "production" | "challenger",
     "model_version": str, "client": "key:<X-Client-Key>" | "addr:<peer address>"}

A client may correct itself: several lines for one id can exist, all kept; `read_feedback` marks every line
after the first for an id `"repeat": true` (the replicas share no memory, so the mark is made on reading),
and the latest is the one to believe (`latest_labels`).

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
from mnist_dagster.storage import Store
from mnist_dagster.storage.journal import Journal
from mnist_dagster.storage.jsonl import JsonLinesLog, read_json_lines


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
    """The JSON-lines log under `feedback/`, taking `FeedbackRecord`s."""

    def __init__(self, store: Store, prefix: str = FEEDBACK_PREFIX, journal: Journal | None = None) -> None:
        super().__init__(store, prefix, journal)


def read_feedback(store: Store, prefix: str = FEEDBACK_PREFIX) -> list[dict]:
    """Every feedback line, oldest object first, each with `repeat`: whether an earlier line (by time)
    labelled the same prediction. What an evaluation of the arms reads."""
    lines = read_json_lines(store, prefix)
    seen: set[str] = set()
    for line in sorted(lines, key=lambda line: datetime.fromisoformat(line["time"])):
        line["repeat"] = line["prediction_id"] in seen
        seen.add(line["prediction_id"])
    return lines


# ----- the latest label of each prediction -----------------------------------------------------------


def latest_lines(feedback: Iterable[dict]) -> dict[str, dict]:
    """prediction_id -> the feedback line sent last for it: a client may correct itself, and a label sent twice
    counts once. Ordered by each line's time; lines of the same time keep the log's order."""
    ordered = sorted(feedback, key=lambda line: datetime.fromisoformat(line["time"]))
    return {line["prediction_id"]: line for line in ordered}


def latest_labels(feedback: Iterable[dict]) -> dict[str, int]:
    """prediction_id -> the label sent last for it (see `latest_lines`)."""
    return {prediction_id: int(line["label"]) for prediction_id, line in latest_lines(feedback).items()}
