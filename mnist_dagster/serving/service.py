"""The request path of the HTTP service, without the HTTP: parse a body, predict, shape the answer.

The serving-path check (`lifecycle/check.py`) sends its images through the same preprocessing
(`scoring.preprocess.prepare_upload`), so what it measures is what the server does.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
from pydantic import ValidationError

from mnist_dagster.digits import IMAGE_SIDE
from mnist_dagster.scoring.bundle import Predictor
from mnist_dagster.scoring.preprocess import InputError, mnist_format, prepare_upload
from mnist_dagster.serving.models import FIELD_RULES, ITEM_TAGS, Base64In, BatchIn, PixelsIn, RequestBody

IMAGE_TYPES = frozenset({"image/png", "image/jpeg", "image/jpg"})
JSON_TYPE = "application/json"
Body = TypeVar("Body", bound=RequestBody)


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
    if kind == JSON_TYPE:
        return mnist_format(pixel_array(parse_json(PixelsIn, body, content_type)))
    if kind not in IMAGE_TYPES:
        raise InputError(
            f"unsupported content type {content_type or '(none)'!r}: send image/png, image/jpeg or application/json",
            415,
        )
    if not body:
        raise InputError('empty body: send a PNG or JPEG image, or JSON {"pixels": 28 rows of 28 numbers 0-255}', 400)
    return prepare_upload(body)


def parse_batch(body: bytes, content_type: str | None) -> np.ndarray:
    """`{"images": [{"pixels": ...} | {"image_base64": "<PNG or JPEG>"}, ...]}` -> float32 (N, 28, 28)."""
    batch = parse_json(BatchIn, body, content_type)
    return np.stack([_batch_item(index, item) for index, item in enumerate(batch.images)])


def _batch_item(index: int, item: PixelsIn | Base64In) -> np.ndarray:
    try:
        if isinstance(item, PixelsIn):
            return mnist_format(pixel_array(item))
        return prepare_upload(_base64(item.image_base64))
    except InputError as error:
        raise InputError(f"images[{index}]: {error}", error.status) from error


def pixel_array(image: PixelsIn) -> np.ndarray:
    """The validated rows as float32 (28, 28), values 0-255."""
    return np.array(image.pixels, dtype=np.float32)


def _base64(value: str) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as error:
        raise InputError(f"'image_base64' is not valid base64 ({error})") from error


def parse_json(model: type[Body], body: bytes, content_type: str | None) -> Body:
    """A JSON body as `model`; raises `InputError`: 415 for another content type, 400 for an empty body or
    invalid JSON, 422 for a document the model refuses (the message says where and what it expects)."""
    if media_type(content_type) != JSON_TYPE:
        raise InputError(f"unsupported content type {content_type or '(none)'!r}: send application/json", 415)
    if not body:
        raise InputError(f"empty body: send JSON {_shape(model)}", 400)
    try:
        return model.model_validate_json(body)
    except ValidationError as error:
        raise refusal(error.errors(include_url=False, include_input=False), model) from None


def refusal(errors: list[dict[str, Any]], model: type[RequestBody]) -> InputError:
    """Pydantic's validation errors for a `model` body -> one `InputError` in words: the unknown or missing
    fields by name, else the first error at its place with the rule of the field it broke."""
    first, shape = errors[0], _shape(model)
    if first["type"] == "json_invalid":
        return InputError(f"body is not valid JSON ({first['msg']})", 400)
    places = [_place(error["loc"]) for error in errors]
    if first["type"] == "model_type" and not places[0]:
        return InputError(f"JSON body must be an object: send {shape}")
    for kind, wording in (("extra_forbidden", "unknown"), ("missing", "missing")):
        at_top = zip(errors, places)
        names = sorted(str(place[0]) for error, place in at_top if error["type"] == kind and len(place) == 1)
        if names:
            return InputError(f"{wording} field(s) {names}: send {shape}")
    return InputError(describe(first))


def describe(error: dict[str, Any]) -> str:
    """One validation error as `where: what (the field's rule)`, e.g. `images[1].pixels[3]: List should have
    at least 28 items after validation, not 27 ('pixels' must be 28 rows of 28 numbers between 0 and 255 ...)`."""
    place = _place(error["loc"])
    field = next((name for name in reversed(place) if name in FIELD_RULES), None)
    rule = f" ('{field}' must be {FIELD_RULES[field]})" if field else ""
    where = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in place).lstrip(".")
    return f"{where or 'body'}: {error['msg']}{rule}"


def _place(loc: tuple) -> tuple:
    """A validation error's location without the batch item's model tag (not a field the client wrote)."""
    return tuple(part for part in loc if part not in ITEM_TAGS)


def _shape(model: type[RequestBody]) -> str:
    """`{"prediction_id": ..., "label": ...}`: the fields a body of `model` has, for refusals."""
    return "{" + ", ".join(f'"{name}": ...' for name in model.model_fields) + "}"


def predict(predictor: Predictor, pixels: np.ndarray) -> list[Prediction]:
    """float32 (28, 28) or (N, 28, 28) in [0, 1] -> one `Prediction` per image."""
    rows = predictor.predict_proba(pixels.reshape(-1, 1, IMAGE_SIDE, IMAGE_SIDE))
    return [_prediction(row, predictor.version) for row in rows]


def _prediction(probabilities: np.ndarray, version: str) -> Prediction:
    rounded = [round(p, 6) for p in probabilities.tolist()]
    digit = int(probabilities.argmax())
    return Prediction(digit, rounded[digit], rounded, version)


def predict_request(predictor: Predictor, body: bytes, content_type: str | None) -> tuple[np.ndarray, list[Prediction]]:
    """`POST /predict` without the HTTP: the image the model saw (28, 28) and its one prediction."""
    pixels = parse_image(body, content_type)
    return pixels, predict(predictor, pixels)


def predict_batch_request(
    predictor: Predictor, body: bytes, content_type: str | None
) -> tuple[np.ndarray, list[Prediction]]:
    """`POST /predict/batch` without the HTTP: the images the model saw (N, 28, 28) and their predictions."""
    pixels = parse_batch(body, content_type)
    return pixels, predict(predictor, pixels)
