"""What the HTTP service documents at `/docs` and `/openapi.json`: answer models, request bodies, refusals.

Documentation only: the handlers parse bodies by hand and serialise answers with `json.dumps`, so
nothing here runs on the request path. The request bodies are written as raw JSON Schema because a
route takes a PNG, a JPEG or JSON on the same path, which a pydantic body parameter cannot say.
"""

from __future__ import annotations

from pydantic import BaseModel, Field

from mnist_dagster.serving import preprocess
from mnist_dagster.serving.service import MAX_BATCH

TITLE = "MNIST digit classifier"
SUMMARY = "Predicts the digit in a handwritten-digit image with the production model."


class PredictionOut(BaseModel):
    digit: int = Field(ge=0, le=9, description="the predicted digit")
    confidence: float = Field(ge=0, le=1, description="probability of the predicted digit")
    probabilities: list[float] = Field(min_length=10, max_length=10, description="probability of each digit 0-9")
    model_version: str = Field(description="the model version that made this prediction")


class BatchOut(BaseModel):
    predictions: list[PredictionOut]


class HealthOut(BaseModel):
    status: str = Field(description="'ok' when a model is loaded, 'no model' otherwise")
    model_version: str | None
    loaded_at: str | None = Field(description="when the serving model was loaded (ISO 8601, UTC)")
    refused: dict[str, str] = Field(description="versions that failed to load, with the reason")


class ErrorOut(BaseModel):
    detail: str


PIXELS = {
    "type": "array",
    "minItems": 28,
    "maxItems": 28,
    "description": "28 rows of 28 grey levels, 0 (background) to 255 (ink) for an MNIST-style image",
    "items": {
        "type": "array",
        "minItems": 28,
        "maxItems": 28,
        "items": {"type": "number", "minimum": 0, "maximum": 255},
    },
}
PIXELS_BODY = {
    "type": "object",
    "required": ["pixels"],
    "additionalProperties": False,
    "properties": {"pixels": PIXELS},
}
IMAGE_BODY = {"type": "string", "format": "binary", "description": "a PNG or JPEG file, at most 1 MB"}
SINGLE_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "image/png": {"schema": IMAGE_BODY},
            "image/jpeg": {"schema": IMAGE_BODY},
            "application/json": {"schema": PIXELS_BODY},
        },
    }
}
BATCH_ITEM = {
    "oneOf": [
        PIXELS_BODY,
        {
            "type": "object",
            "required": ["image_base64"],
            "additionalProperties": False,
            "properties": {
                "image_base64": {"type": "string", "contentEncoding": "base64", "description": "a base64 PNG or JPEG"}
            },
        },
    ]
}
BATCH_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["images"],
                    "additionalProperties": False,
                    "properties": {
                        "images": {"type": "array", "minItems": 1, "maxItems": MAX_BATCH, "items": BATCH_ITEM}
                    },
                }
            }
        },
    }
}
ERRORS = {
    400: {"model": ErrorOut, "description": "empty body, invalid JSON, or bytes that are not a PNG/JPEG image"},
    413: {"model": ErrorOut, "description": "body larger than 1 MB"},
    415: {"model": ErrorOut, "description": "unsupported content type"},
    422: {"model": ErrorOut, "description": "wrong shape, NaN, values outside 0-255, a blank image, unknown fields"},
    503: {"model": ErrorOut, "description": "no model loaded yet"},
}


def answers(model: type[BaseModel], errors: dict[int, dict] = ERRORS) -> dict[int, dict]:
    """The `responses` of an operation: `model` with 200, and the refusals it can give."""
    return {200: {"model": model}, **errors}


def description() -> str:
    recipe = (preprocess.__doc__ or "").split("\n", 1)[1].strip()
    return (
        "Serves the production model that the Dagster asset `digit_predictions` publishes, and switches to a "
        "newly published one without a restart.\n\n**Preprocessing.** " + recipe
    )
