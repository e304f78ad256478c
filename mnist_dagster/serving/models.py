"""The HTTP bodies as pydantic models: what the routes validate (`Model.model_validate_json`, in
`service.parse_json`) and, from the same classes, what `/openapi.json` documents (the last part below).

Request models forbid unknown fields and coerce nothing (a pixel is a number, a label an integer), so the
schema a client reads is exactly the rule the server applies; each field's `description` is also the
sentence a refusal quotes. Response models only document: the routes serialise their answers with orjson.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Literal

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag
from pydantic.json_schema import models_json_schema

from mnist_dagster.digits import IMAGE_SIDE, NUM_CLASSES
from mnist_dagster.lifecycle.record import CHALLENGER, PRODUCTION, Strategy
from mnist_dagster.scoring import preprocess

MAX_BATCH = 256
MAX_BODY_BYTES = 1_000_000
CLIENT_KEY_HEADER = "X-Client-Key"  # any stable client id: the same arm all through an A/B trial
CLIENT_KEY_PARAMETER = {
    "name": CLIENT_KEY_HEADER,
    "in": "header",
    "required": False,
    "schema": {"type": "string"},
    "description": "any stable client id: during an A/B test, the same key always gets the same arm",
}


# ----- requests ---------------------------------------------------------------------------------------
class RequestBody(BaseModel):
    """A JSON request body: no unknown fields, no coercion (`"7"` is not 7, `7.0` is not a label)."""

    model_config = ConfigDict(extra="forbid", strict=True)


Grey = Annotated[float, Field(ge=0, le=255, allow_inf_nan=False)]
Row = Annotated[list[Grey], Field(min_length=IMAGE_SIDE, max_length=IMAGE_SIDE)]


class PixelsIn(RequestBody):
    """One image as numbers."""

    pixels: Annotated[list[Row], Field(min_length=IMAGE_SIDE, max_length=IMAGE_SIDE)] = Field(
        description=f"{IMAGE_SIDE} rows of {IMAGE_SIDE} numbers between 0 and 255: grey levels, 0 the background "
        "and 255 the ink, as in MNIST"
    )


class Base64In(RequestBody):
    """One image as a file, in base64."""

    image_base64: str = Field(
        description="a PNG or JPEG file in base64", json_schema_extra={"contentEncoding": "base64"}
    )


def _image_kind(item: Any) -> str:
    """Which model an item of a batch is: `image_base64` when it names only that, else `pixels` (so a
    stray item is refused with what `{"pixels"}` lacks, not with both models' complaints)."""
    if isinstance(item, dict) and "image_base64" in item and "pixels" not in item:
        return "Base64In"
    return "PixelsIn"


BatchImage = Annotated[
    Annotated[PixelsIn, Tag("PixelsIn")] | Annotated[Base64In, Tag("Base64In")], Discriminator(_image_kind)
]
ITEM_TAGS = frozenset({"PixelsIn", "Base64In"})  # appear in validation errors' locations; not fields


class BatchIn(RequestBody):
    """Up to `MAX_BATCH` images in one body."""

    images: list[BatchImage] = Field(
        min_length=1,
        max_length=MAX_BATCH,
        description=f'a list of 1 to {MAX_BATCH} images, each {{"pixels": ...}} or {{"image_base64": ...}}',
    )


class FeedbackIn(RequestBody):
    """The true label of an earlier prediction."""

    prediction_id: str = Field(description="the string a prediction answered with (its `prediction_id`)")
    label: int = Field(ge=0, le=9, description="an integer digit 0-9, the true digit")


REQUEST_MODELS: tuple[type[RequestBody], ...] = (PixelsIn, Base64In, BatchIn, FeedbackIn)
FIELD_RULES = {name: field.description for model in REQUEST_MODELS for name, field in model.model_fields.items()}


# ----- responses --------------------------------------------------------------------------------------
class PredictionOut(BaseModel):
    digit: int = Field(ge=0, le=9, description="the predicted digit")
    confidence: float = Field(ge=0, le=1, description="probability of the predicted digit")
    probabilities: list[float] = Field(
        min_length=NUM_CLASSES, max_length=NUM_CLASSES, description="probability of each digit 0-9"
    )
    model_version: str = Field(description="the model version that made this prediction")
    prediction_id: str = Field(description="names this prediction in `POST /feedback` and in the prediction log")
    arm: Literal[PRODUCTION, CHALLENGER] = Field(description="which model answered (see the routing)")


class BatchOut(BaseModel):
    predictions: list[PredictionOut]


class FeedbackOut(BaseModel):
    prediction_id: str
    label: int = Field(ge=0, le=9)
    recorded: bool = Field(description="queued for the feedback log (false when the server keeps no log)")


class RoutingOut(BaseModel):
    strategy: Strategy
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
    routing: RoutingOut = Field(description="the routing in force (production only without a challenger)")
    routing_note: str | None = Field(description="why the deployment record is not in force (missing or invalid)")
    trial_id: str | None = Field(description="the A/B or shadow trial in progress, if any")
    shadow: ShadowOut | None = Field(description="shadow scoring counts (null without a prediction log)")
    journal: dict[str, Any] | None = Field(
        None, description="the write path: journal bytes waiting, segments shipped, rows dropped, whether full"
    )


class ErrorOut(BaseModel):
    """Every refusal, whatever its status: one sentence saying what is wrong and what to send instead."""

    detail: str


# ----- what /openapi.json says -------------------------------------------------------------------------

TITLE = "MNIST digit classifier"
SUMMARY = "Predicts the digit in a handwritten-digit image with the production model."
IMAGE_FILE = {"type": "string", "format": "binary", "description": "a PNG or JPEG file, at most 1 MB"}
SCHEMA_REF = "#/components/schemas/{model}"


def refusals(descriptions: dict[int, str]) -> dict[int | str, dict[str, Any]]:
    """The `responses` entries of the refusals an operation gives, each documented with `ErrorOut`."""
    return {status: {"model": ErrorOut, "description": text} for status, text in descriptions.items()}


PREDICT_REFUSALS = refusals(
    {
        400: "empty body, invalid JSON, or bytes that are not a PNG/JPEG image",
        413: "body larger than 1 MB",
        415: "unsupported content type",
        422: "wrong shape, NaN, values outside 0-255, a blank image, unknown fields",
        503: "no model loaded yet",
    }
)
FEEDBACK_REFUSALS = refusals(
    {
        400: "empty body or invalid JSON",
        401: "MNIST_FEEDBACK_TOKEN is set and the bearer token is missing or wrong",
        404: "a prediction_id no replica issued (its signature does not verify)",
        410: "a prediction older than the feedback TTL (feedback_ttl_days, default 30)",
        413: "body larger than 1 MB",
        415: "unsupported content type",
        422: "a missing or unknown field, a label that is not an integer 0-9",
        429: "this client's feedback rate limit (see the Retry-After header)",
        503: "the feedback journal is full (the store has been unreachable for long): try again later",
    }
)


def request_body(content: dict[str, dict[str, Any] | type[BaseModel]], client_key: bool = False) -> dict[str, Any]:
    """`openapi_extra` for a body the route reads itself: media type -> a schema, or a model (referenced;
    `with_request_schemas` puts its schema in the components). With `client_key`, the optional `X-Client-Key`
    header the route reads itself: a FastAPI header parameter would be resolved as a dependency on every request
    (~40 us of the ~0.3 ms a prediction costs in the server)."""

    def schema(value: dict[str, Any] | type[BaseModel]) -> dict[str, Any]:
        return value if isinstance(value, dict) else {"$ref": SCHEMA_REF.format(model=value.__name__)}

    media = {media_type: {"schema": schema(value)} for media_type, value in content.items()}
    extra: dict[str, Any] = {"requestBody": {"required": True, "content": media}}
    if client_key:
        extra["parameters"] = [CLIENT_KEY_PARAMETER]
    return extra


def with_request_schemas(app: FastAPI) -> Callable[[], dict[str, Any]]:
    """`app.openapi` with the request models' schemas added to the components. The routes read their
    bodies themselves (one path takes a PNG, a JPEG or JSON, which a body parameter cannot say; and every
    refusal keeps the one error style), so FastAPI does not find these models on its own."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = generate()
            requests = [(model, "validation") for model in REQUEST_MODELS]
            _, schemas = models_json_schema(requests, ref_template=SCHEMA_REF)
            document.setdefault("components", {}).setdefault("schemas", {}).update(schemas["$defs"])
        return app.openapi_schema

    return openapi


def description() -> str:
    """The API's description at `/docs`: what it serves, and the preprocessing recipe in `preprocess`'s words."""
    recipe = (preprocess.__doc__ or "").split("\n", 1)[1].strip()
    return (
        "Serves the production model that the Dagster asset `digit_predictions` publishes, and switches to a "
        "newly published one without a restart. A challenger can be served beside it, in an A/B test or in "
        "the shadow (`/health` says which); every answer names its `arm`, `model_version` and `prediction_id`, "
        "and `POST /feedback` records the true label of a prediction. `GET /` is a page to draw a digit on.\n\n"
        "**Preprocessing.** " + recipe
    )
