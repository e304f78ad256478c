"""The request path of the HTTP service, without the HTTP: parse a body, predict, shape the answer.

The serving-path check (`lifecycle/check.py`) sends its images through the same preprocessing
(`scoring.preprocess.prepare_upload`), so what it measures is what the server does.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from mnist_dagster.scoring.bundle import Predictor
from mnist_dagster.scoring.preprocess import InputError, mnist_format, pixels_from_json, prepare_upload

IMAGE_TYPES = frozenset({"image/png", "image/jpeg", "image/jpg"})
JSON_TYPE = "application/json"
MAX_BODY_BYTES = 1_000_000
MAX_BATCH = 256


@dataclass(frozen=True)
class Prediction:
    digit: int
    confidence: float
    probabilities: list[float]
    model_version: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "digit": self.digit,
            "confidence": self.confidence,
            "probabilities": self.probabilities,
            "model_version": self.model_version,
        }


def media_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


def parse_image(body: bytes, content_type: str | None) -> np.ndarray:
    """One image as a PNG/JPEG body or JSON `{"pixels": 28x28}` -> float32 (28, 28) in [0, 1]."""
    kind = media_type(content_type)
    if kind not in IMAGE_TYPES and kind != JSON_TYPE:
        raise InputError(
            f"unsupported content type {content_type or '(none)'!r}: send image/png, image/jpeg or application/json",
            415,
        )
    if not body:
        raise InputError('empty body: send a PNG or JPEG image, or JSON {"pixels": 28 rows of 28 numbers 0-255}', 400)
    if kind in IMAGE_TYPES:
        return prepare_upload(body)
    document = json_object(body, allowed={"pixels"})
    if "pixels" not in document:
        raise InputError('JSON body must be {"pixels": 28 rows of 28 numbers 0-255}')
    return mnist_format(pixels_from_json(document["pixels"]))


def parse_batch(body: bytes, content_type: str | None) -> np.ndarray:
    """`{"images": [{"pixels": ...} | {"image_base64": "<PNG or JPEG>"}, ...]}` -> float32 (N, 28, 28)."""
    if media_type(content_type) != JSON_TYPE:
        raise InputError(f"unsupported content type {content_type or '(none)'!r}: send application/json", 415)
    if not body:
        raise InputError('empty body: send JSON {"images": [...]}', 400)
    items = json_object(body, allowed={"images"}).get("images")
    if not isinstance(items, list) or not 1 <= len(items) <= MAX_BATCH:
        raise InputError(f"'images' must be a list of 1 to {MAX_BATCH} images")
    return np.stack([_batch_item(index, item) for index, item in enumerate(items)])


def _batch_item(index: int, item: Any) -> np.ndarray:
    try:
        if not isinstance(item, dict) or len(item) != 1 or not {"pixels", "image_base64"} & item.keys():
            raise InputError('each image must be {"pixels": 28x28 numbers} or {"image_base64": "<PNG or JPEG>"}')
        if "pixels" in item:
            return mnist_format(pixels_from_json(item["pixels"]))
        return prepare_upload(_base64(item["image_base64"]))
    except InputError as error:
        raise InputError(f"images[{index}]: {error}", error.status) from error


def _base64(value: Any) -> bytes:
    if not isinstance(value, str):
        raise InputError("'image_base64' must be a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as error:
        raise InputError(f"'image_base64' is not valid base64 ({error})") from error


def json_object(body: bytes, allowed: set[str]) -> dict[str, Any]:
    try:
        document = json.loads(body)
    except (ValueError, RecursionError) as error:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise InputError(f"body is not valid JSON ({type(error).__name__})", 400) from error
    if not isinstance(document, dict):
        raise InputError(f"JSON body must be an object with {' or '.join(sorted(allowed))}")
    unknown = document.keys() - allowed
    if unknown:
        raise InputError(f"unknown field(s) {sorted(unknown)}: expected {sorted(allowed)}")
    return document


def predict(predictor: Predictor, pixels: np.ndarray) -> list[Prediction]:
    """float32 (28, 28) or (N, 28, 28) in [0, 1] -> one `Prediction` per image."""
    return [_prediction(row, predictor.version) for row in predictor.predict_proba(pixels.reshape(-1, 1, 28, 28))]


def _prediction(probabilities: np.ndarray, version: str) -> Prediction:
    rounded = [round(p, 6) for p in probabilities.tolist()]
    digit = int(probabilities.argmax())
    return Prediction(digit, rounded[digit], rounded, version)


def predict_request(predictor: Predictor, body: bytes, content_type: str | None) -> Prediction:
    """`POST /predict` without the HTTP."""
    return predict(predictor, parse_image(body, content_type))[0]


def predict_batch_request(predictor: Predictor, body: bytes, content_type: str | None) -> list[Prediction]:
    """`POST /predict/batch` without the HTTP."""
    return predict(predictor, parse_batch(body, content_type))
