"""What the HTTP service documents at `/docs` and `/openapi.json`: answer models, request bodies, refusals.

Documentation only: the handlers parse bodies by hand and serialise answers with `json.dumps`, so
nothing here runs on the request path. The request bodies are written as raw JSON Schema because a
route takes a PNG, a JPEG or JSON on the same path, which a pydantic body parameter cannot say.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from mnist_dagster.scoring import preprocess
from mnist_dagster.serving import routing
from mnist_dagster.serving.service import MAX_BATCH

TITLE = "MNIST digit classifier"
SUMMARY = "Predicts the digit in a handwritten-digit image with the production model."


class PredictionOut(BaseModel):
    digit: int = Field(ge=0, le=9, description="the predicted digit")
    confidence: float = Field(ge=0, le=1, description="probability of the predicted digit")
    probabilities: list[float] = Field(min_length=10, max_length=10, description="probability of each digit 0-9")
    model_version: str = Field(description="the model version that made this prediction")
    prediction_id: str = Field(description="names this prediction in `POST /feedback` and in the prediction log")
    arm: Literal["production", "challenger"] = Field(description="which model answered (see the routing)")


class BatchOut(BaseModel):
    predictions: list[PredictionOut]


class RoutingOut(BaseModel):
    strategy: Literal["replace", "ab_test", "shadow"]
    challenger_traffic: float = Field(ge=0, le=1, description="share of requests the challenger answers (ab_test)")


class ShadowOut(BaseModel):
    queued: int = Field(description="images waiting for the challenger")
    scored: int = Field(description="images the challenger scored since the server started")
    dropped: int = Field(description="images not shadow-scored because the queue was full")
    failed: int = Field(description="images the challenger failed to score")


class HealthOut(BaseModel):
    status: str = Field(description="'ok' when a model is loaded, 'no model' otherwise")
    model_version: str | None = Field(description="the production model's version")
    loaded_at: str | None = Field(description="when the serving model was loaded (ISO 8601, UTC)")
    refused: dict[str, str] = Field(description="versions that failed to load, with the reason")
    challenger_version: str | None = Field(description="the challenger's version, when one is loaded")
    challenger_loaded_at: str | None
    challenger_refused: dict[str, str] = Field(description="challenger versions that failed to load, with the reason")
    routing: RoutingOut = Field(description="the routing read from the store (production only without a challenger)")
    routing_note: str | None = Field(description="why the routing file is not in force (missing or invalid)")
    shadow: ShadowOut | None = Field(description="shadow scoring counts (null without a prediction log)")


class FeedbackOut(BaseModel):
    prediction_id: str
    label: int = Field(ge=0, le=9)
    recorded: bool = Field(description="queued for the feedback log (false when the server keeps no log)")


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
CLIENT_KEY = {
    "parameters": [
        {
            "name": routing.CLIENT_KEY_HEADER,
            "in": "header",
            "required": False,
            "schema": {"type": "string"},
            "description": "any stable client id: during an A/B test, the same key always gets the same arm",
        }
    ]
}
IMAGE_BODY = {"type": "string", "format": "binary", "description": "a PNG or JPEG file, at most 1 MB"}
SINGLE_BODY = {
    **CLIENT_KEY,
    "requestBody": {
        "required": True,
        "content": {
            "image/png": {"schema": IMAGE_BODY},
            "image/jpeg": {"schema": IMAGE_BODY},
            "application/json": {"schema": PIXELS_BODY},
        },
    },
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
    **CLIENT_KEY,
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
    },
}
FEEDBACK_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["prediction_id", "label"],
                    "additionalProperties": False,
                    "properties": {
                        "prediction_id": {"type": "string", "description": "from a /predict answer"},
                        "label": {"type": "integer", "minimum": 0, "maximum": 9, "description": "the true digit"},
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

FEEDBACK_ERRORS = {
    400: {"model": ErrorOut, "description": "empty body or invalid JSON"},
    404: {"model": ErrorOut, "description": "a prediction_id this server did not issue (or no longer remembers)"},
    413: {"model": ErrorOut, "description": "body larger than 1 MB"},
    415: {"model": ErrorOut, "description": "unsupported content type"},
    422: {"model": ErrorOut, "description": "a missing or unknown field, a label that is not an integer 0-9"},
}


def answers(model: type[BaseModel], errors: dict[int, dict] = ERRORS, status: int = 200) -> dict[int, dict]:
    """The `responses` of an operation: `model` with `status`, and the refusals it can give."""
    return {status: {"model": model}, **errors}


def description() -> str:
    recipe = (preprocess.__doc__ or "").split("\n", 1)[1].strip()
    return (
        "Serves the production model that the Dagster asset `digit_predictions` publishes, and switches to a "
        "newly published one without a restart. A challenger can be served beside it, in an A/B test or in "
        "the shadow (`/health` says which); every answer names its `arm`, `model_version` and `prediction_id`, "
        "and `POST /feedback` records the true label of a prediction. `GET /` is a page to draw a digit on.\n\n"
        "**Preprocessing.** " + recipe
    )
