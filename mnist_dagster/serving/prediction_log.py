"""What the service served, for monitoring: one JSON line per prediction under `prediction_log/`, journaled
before the answer leaves and shipped to the store by the shared writer (`storage/jsonl.py`, `storage/journal.py`,
`storage/shipper.py`).

    prediction_log/date=YYYY-MM-DD/<UTC time sealed>-<host>-<pid>-<start>-<sequence>.jsonl

One line per prediction, keys in this order:

    {"time": ISO-8601 UTC, "prediction_id": str (`serving/ids.py`), "arm": "production" | "challenger",
     "model_version": str, "digit": 0-9, "confidence": float, "endpoint": "predict" | "predict/batch",
     "image": base64 of 784 bytes,                          <- last but for the optional keys:
     "input": "json" | "upload", "client": 16 hex, "status": int, "latency_ms": float}
                                       <- the input path when the server knows it; a hash of the X-Client-Key;
                                          an error's status

In shadow mode the challenger scores a request after it was answered (and journaled), so its digit follows as
an amendment line, `{"time": the prediction's, "prediction_id", "shadow_digit", "shadow_version", "amends":
"prediction"}`, which `read_prediction_log` folds into the prediction's line (same day folder, a later or the
same object). Readers that parse objects themselves skip it: it has no `model_version` and no `image`.

`image` is what the model actually saw: the preprocessed 28x28 image (white digit on black, MNIST
format), row-major, one uint8 per pixel (round(value * 255)); `logged_image` decodes it.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import numpy as np

from mnist_dagster.digits import IMAGE_SHAPE
from mnist_dagster.layout import PREDICTION_LOG_PREFIX
from mnist_dagster.storage import Store, StoredObject
from mnist_dagster.storage.journal import STAMP_FORMAT, Journal
from mnist_dagster.storage.jsonl import JsonLinesLog, iso_utc, json_line, read_json_lines

AMENDS = "amends"  # an amendment line's marker: its fields are merged into the line of its prediction_id


@dataclass(slots=True)
class PredictionRecord:
    """One served prediction, as the request path hands it over: cheap to build (no encoding here), and
    mutable so the shadow worker can add the challenger's digit before it is logged."""

    time: float
    prediction_id: str
    arm: str
    model_version: str
    digit: int
    confidence: float
    endpoint: str
    pixels: np.ndarray  # float32 (28, 28) in [0, 1]: the model's input; encoded by the writer thread
    shadow_digit: int | None = None
    shadow_version: str | None = None
    client: str | None = None  # `assignment.client_tag` of the request's client key; None: no key sent
    status: int | None = None  # set only when the answer was an error (the A/B report's error guardrail)
    input: str | None = None  # "json" pixels or an image "upload": drift judges each path on its own
    latency_ms: float | None = None  # the request's time in the server: the A/B report's p99 guardrail

    def line(self) -> dict[str, Any]:
        """The line's fields but `time` and `image` (`PredictionLog.encode` encodes a batch's images at once)."""
        fields = {
            "prediction_id": self.prediction_id,
            "arm": self.arm,
            "model_version": self.model_version,
            "digit": self.digit,
            "confidence": self.confidence,
            "endpoint": self.endpoint,
        }
        if self.input is not None:
            fields["input"] = self.input
        if self.shadow_version is not None:
            fields["shadow_digit"], fields["shadow_version"] = self.shadow_digit, self.shadow_version
        if self.client is not None:
            fields["client"] = self.client
        if self.status is not None:
            fields["status"] = self.status
        if self.latency_ms is not None:
            fields["latency_ms"] = self.latency_ms
        return fields


def encode_images(pixels: np.ndarray) -> list[str]:
    """float (N, 28, 28) in [0, 1] -> base64 of each image's 784 uint8 grey levels (a sixth of the size of
    the JSON numbers), in one numpy pass for the lot."""
    grey = np.rint(np.clip(pixels.reshape(len(pixels), -1), 0.0, 1.0) * 255).astype(np.uint8)
    return [base64.b64encode(row).decode("ascii") for row in grey]


def logged_image(value: str) -> np.ndarray:
    """A line's `image` -> uint8 (28, 28), white digit on black (divide by 255 for the model's input)."""
    return np.frombuffer(base64.b64decode(value), dtype=np.uint8).reshape(IMAGE_SHAPE)


class PredictionLog(JsonLinesLog):
    """The JSON-lines log under `prediction_log/`, taking `PredictionRecord`s."""

    def __init__(self, store: Store, prefix: str = PREDICTION_LOG_PREFIX, journal: Journal | None = None) -> None:
        super().__init__(store, prefix, journal)

    def encode(self, records: Sequence[PredictionRecord]) -> bytes:  # type: ignore[override]
        """The lines of `PredictionRecord`s, their images encoded together in one numpy pass. On the request
        path, so the base64 image (no character JSON would escape) is spliced in rather than scanned by the
        JSON encoder: a third of the cost of a line."""
        pixels = records[0].pixels[None] if len(records) == 1 else np.stack([record.pixels for record in records])
        return b"".join(
            json_line({"time": iso_utc(record.time), **record.line()})[:-2] + b',"image":"' + image.encode() + b'"}\n'
            for record, image in zip(records, encode_images(pixels))
        )

    def record_shadow(self, records: Sequence[PredictionRecord]) -> bool:
        """The challenger's digits for predictions already journaled, as amendment lines."""
        lines = [
            json_line({"time": iso_utc(r.time), "prediction_id": r.prediction_id, "shadow_digit": r.shadow_digit,
                       "shadow_version": r.shadow_version, AMENDS: "prediction"})
            for r in records if r.shadow_version is not None
        ]  # fmt: skip
        return self.journal.append(self.prefix, b"".join(lines), len(lines)) if lines else True


def object_stamp(key: str) -> str:
    """A log object's name without its folder: `<UTC time written>-<host>-<pid>-<sequence>.jsonl`. Names
    sort by when they were written, whichever day's folder they went to (lines that waited for an
    unreachable store go to their own day's folder, later), so the greatest name read is a cursor."""
    return key.rsplit("/", 1)[-1]


def log_objects_after(
    store: Store, after: str, settled_before: datetime, prefix: str = PREDICTION_LOG_PREFIX
) -> list[StoredObject]:
    """The log objects written after the object named `after` (`object_stamp`; "" for all) and before
    `settled_before`: an object named a moment ago may have a sibling from another replica still on its way,
    so a reader keeps a margin rather than move its cursor past a name not yet listed."""
    limit = settled_before.astimezone(timezone.utc).strftime(STAMP_FORMAT)
    objects = [
        item for item in store.list(prefix)
        if item.key.endswith(".jsonl") and after < object_stamp(item.key) and object_stamp(item.key)[:22] <= limit
    ]  # fmt: skip
    return sorted(objects, key=lambda item: object_stamp(item.key))


def decode_images(values: list[str]) -> np.ndarray:
    """Many lines' `image` -> float32 (N, 28, 28) in [0, 1], the model's input, in one numpy pass."""
    if not values:
        return np.zeros((0, *IMAGE_SHAPE), np.float32)
    grey = np.frombuffer(b"".join(base64.b64decode(value) for value in values), dtype=np.uint8)
    return grey.reshape(-1, *IMAGE_SHAPE).astype(np.float32) / 255


def read_prediction_log(store: Store, prefix: str = PREDICTION_LOG_PREFIX) -> list[dict]:
    """Every logged prediction, oldest object first, amendments folded into the line they amend (one whose
    line is not found is passed over): what a monitoring job reads."""
    records: list[dict] = []
    by_id: dict[str, dict] = {}
    for line in read_json_lines(store, prefix):
        if AMENDS in line:
            target = by_id.get(line.get("prediction_id", ""))
            if target is not None:
                target.update({k: v for k, v in line.items() if k not in {AMENDS, "time"}})
            continue
        records.append(line)
        if "prediction_id" in line:
            by_id[line["prediction_id"]] = line
    return records
