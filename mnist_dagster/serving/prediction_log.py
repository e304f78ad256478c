"""What the service served, for monitoring: one JSON line per prediction under `prediction_log/`, written off
the request path by the shared JSON-lines writer (`serving/jsonl.py`: a request only enqueues).

    prediction_log/date=YYYY-MM-DD/<UTC time>-<host>-<pid>-<sequence>.jsonl

One line per prediction, keys in this order:

    {"time": ISO-8601 UTC, "prediction_id": 32 hex, "arm": "production" | "challenger",
     "model_version": str, "digit": 0-9, "confidence": float, "endpoint": "predict" | "predict/batch",
     "image": base64 of 784 bytes,
     "input": "json" | "upload"                              <- the input path, when the server knows it
     "shadow_digit": 0-9, "shadow_version": str}            <- in shadow mode only, when the challenger scored it

`image` is what the model actually saw: the preprocessed 28x28 image (white digit on black, MNIST
format), row-major, one uint8 per pixel (round(value * 255)); `logged_image` decodes it. A line is
about 1.3 KB, so the lines waiting for an unreachable store are capped at `max_pending` (200,000:
about 260 MB) rather than the writer's default.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import numpy as np

from mnist_dagster.layout import PREDICTION_LOG_PREFIX
from mnist_dagster.serving.jsonl import JsonLinesLog, LogRecord, iso_utc, read_json_lines
from mnist_dagster.storage import Store, StoredObject

MAX_PENDING_PREDICTIONS = 200_000
IMAGE_SHAPE = (28, 28)
STAMP_FORMAT = "%Y%m%dT%H%M%S%fZ"  # how `JsonLinesLog` names its objects: 22 characters, sorting by time


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
    input: str | None = None  # "json" pixels or an image "upload": drift judges each path on its own

    def line(self, image: str | None = None) -> dict[str, Any]:
        """The line's fields but `time`; `image` when the writer already encoded it with a whole batch."""
        line = {
            "prediction_id": self.prediction_id,
            "arm": self.arm,
            "model_version": self.model_version,
            "digit": self.digit,
            "confidence": self.confidence,
            "endpoint": self.endpoint,
            "image": image if image is not None else encode_images(self.pixels[None])[0],
        }
        if self.input is not None:
            line["input"] = self.input
        if self.shadow_version is not None:
            line["shadow_digit"], line["shadow_version"] = self.shadow_digit, self.shadow_version
        return line


def encode_images(pixels: np.ndarray) -> list[str]:
    """float (N, 28, 28) in [0, 1] -> base64 of each image's 784 uint8 grey levels (a sixth of the size of
    the JSON numbers), in one numpy pass for the lot."""
    grey = np.rint(np.clip(pixels.reshape(-1, 784), 0.0, 1.0) * 255).astype(np.uint8)
    return [base64.b64encode(row).decode("ascii") for row in grey]


def logged_image(value: str) -> np.ndarray:
    """A line's `image` -> uint8 (28, 28), white digit on black (divide by 255 for the model's input)."""
    return np.frombuffer(base64.b64decode(value), dtype=np.uint8).reshape(IMAGE_SHAPE)


class PredictionLog(JsonLinesLog):
    """The JSON-lines writer under `prediction_log/`, taking `PredictionRecord`s."""

    def __init__(
        self,
        store: Store,
        prefix: str = PREDICTION_LOG_PREFIX,
        flush_seconds: float = 5.0,
        max_pending: int = MAX_PENDING_PREDICTIONS,
    ) -> None:
        super().__init__(store, prefix, flush_seconds, max_pending)

    def encode(self, records: list[LogRecord]) -> list[str]:
        """The lines of `PredictionRecord`s, their images encoded together (the bulk of the writer's work)."""
        images = encode_images(np.stack([record.pixels for record in records]))
        return [
            json.dumps({"time": iso_utc(record.time), **record.line(image)}) for record, image in zip(records, images)
        ]


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
    """Every logged prediction, oldest object first: what a monitoring job reads."""
    return read_json_lines(store, prefix)
