"""The real-time endpoint: FastAPI over the newest serving bundle in the store.

`DigitService` holds the deployment watcher (production, challenger, routing: see `serving/routing.py` for the
contract with the Dagster side), the logs and the shadow scorer; each route is one of its methods, marked
with `@route`, and `create_app` builds the FastAPI app from them. Every answer names its `prediction_id`,
`arm` and `model_version`; the server remembers the ids it issued so that `POST /feedback` can take the
true label of one. Every refusal is raised, as an
`InputError` (the client's to fix) or `NoModel`, and turned into `{"detail": ...}` with its status by
`refusal`, both by the FastAPI exception handlers and by the ASGI fast path for `POST /predict`.

Kept lean for a small CPU: the single-image endpoint is `async` and calls ONNX Runtime directly (one
image takes less time than handing it to a worker thread would), bodies are parsed by hand rather
than through pydantic, answers are serialised once with `json.dumps`, the routing is a few attribute
reads, and the logs and the shadow scorer only enqueue. What `/docs` and `/openapi.json` show is described in `serving/openapi.py`.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import Response
from fastapi.routing import APIRoute
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from mnist_dagster.serving import openapi, page, routing, service
from mnist_dagster.serving.feedback import FeedbackLog, FeedbackRecord, IssuedPredictions, parse_feedback
from mnist_dagster.serving.prediction_log import PredictionLog, PredictionRecord
from mnist_dagster.scoring.preprocess import InputError
from mnist_dagster.serving.routing import Assignment, Router
from mnist_dagster.serving.service import MAX_BODY_BYTES, Prediction
from mnist_dagster.serving.watcher import DeploymentWatcher
from mnist_dagster.serving.shadow import ShadowScorer
from mnist_dagster.digits import IMAGE_SIDE
from mnist_dagster.storage import Store

JSON = "application/json"
CLIENT_KEY = routing.CLIENT_KEY_HEADER.lower()
NO_MODEL_DETAIL = "no model loaded yet: nothing is deployed in this store (materialize production_digit_classifier)"


class NoModel(Exception):
    """No bundle has been published to the serving location yet (or none loaded)."""

    status = 503

    def __init__(self, message: str = NO_MODEL_DETAIL) -> None:
        super().__init__(message)


Refusal = (InputError, NoModel)


def refusal(error: InputError | NoModel) -> tuple[int, bytes]:
    """The one error style: (status, JSON `{"detail": message}`) for every refused request."""
    return error.status, json.dumps({"detail": str(error)}).encode()


@dataclass(frozen=True)
class RouteSpec:
    """How a `DigitService` method is served and documented (keyword arguments of `add_api_route`)."""

    method: str
    path: str
    options: dict[str, Any] = field(default_factory=dict)


def route(method: str, path: str, **options: Any) -> Callable:
    """Marks a `DigitService` method as the handler of `method path`. The method takes the bare
    `Request` and returns a `Response`; `options` (`responses`, `openapi_extra`, `include_in_schema`,
    ...) go to FastAPI's `add_api_route` and only shape the OpenAPI document."""

    def mark(handler: Callable) -> Callable:
        handler.route = RouteSpec(method, path, options)
        return handler

    return mark


class DirectRoute(APIRoute):
    """A route FastAPI documents like any other, but calls with the bare `Request`: the endpoint parses
    the body itself and returns a `Response`, so no dependency solving or response validation runs."""

    def get_route_handler(self):
        return self.endpoint


@dataclass
class Logs:
    """Where the service records what it did; either may be None (not recorded)."""

    predictions: PredictionLog | None = None
    feedback: FeedbackLog | None = None


class DigitService:
    """The service over `store`: serves the models the deployment record names, and follows it as it moves."""

    def __init__(self, store: Store, poll_seconds: float, logs: Logs | None = None) -> None:
        # One ONNX thread for the challenger: its shadow batches then run on the shadow scorer's own (lowered
        # priority) thread and never take more than one core from production; a single image is no slower.
        self.watcher = DeploymentWatcher(store, poll_seconds, challenger_threads=1)
        self.router = Router(self.watcher)
        self.logs = logs or Logs()
        # Without a prediction log there is nowhere to put the shadow's digits: no shadow scoring then.
        self.shadow = ShadowScorer(self.logs.predictions) if self.logs.predictions else None
        self.issued = IssuedPredictions()
        self.static = page.load_static()

    @asynccontextmanager
    async def lifespan(self, _app: FastAPI) -> AsyncIterator[None]:
        # Started sinks first, sources last; stopped the other way, so the shadow's last digits reach the log.
        parts = [self.logs.predictions, self.logs.feedback, self.shadow]
        parts.append(self.watcher)
        started = [part for part in parts if part is not None]
        for part in started:
            part.start()
        try:
            yield
        finally:
            for part in reversed(started):
                part.stop()

    def assign(self, client_key: str | None) -> Assignment:
        """Which model answers this request (see `Router.choose`); raises `NoModel` while none is loaded."""
        assignment = self.router.choose(client_key)
        if assignment is None:
            raise NoModel()
        return assignment

    def issue(
        self, assignment: Assignment, pixels: np.ndarray, predictions: list[Prediction], endpoint: str,
        input_path: str | None = None,
    ) -> list[dict[str, Any]]:
        """The answers to `predictions`, each with a new `prediction_id` (remembered for `/feedback`) and its
        arm; their log records are handed to the log, or through the shadow scorer, which only enqueue."""
        now, arm, images = time.time(), assignment.arm, pixels.reshape(-1, IMAGE_SIDE, IMAGE_SIDE)
        answers, records = [], []
        for image, p in zip(images, predictions):
            prediction_id = os.urandom(16).hex()
            self.issued.add(prediction_id, assignment.label)
            answers.append({**p.as_dict(), "prediction_id": prediction_id, "arm": arm})
            records.append(
                PredictionRecord(now, prediction_id, arm, p.model_version, p.digit, p.confidence, endpoint, image,
                                 input=input_path)
            )
        if self.logs.predictions is not None:
            if assignment.shadow is not None and self.shadow is not None:
                self.shadow.submit(assignment.shadow, images, records)
            else:
                for record in records:
                    self.logs.predictions.record(record)
        return answers

    def answer_predict(self, body: bytes, content_type: str | None, client_key: str | None = None) -> bytes:
        """The JSON answer to `POST /predict`, shared by the route and the fast path; raises a refusal."""
        assignment = self.assign(client_key)
        pixels = service.parse_image(body, content_type)
        predictions = service.predict(assignment.model.predictor, pixels)
        input_path = "upload" if service.media_type(content_type) in service.IMAGE_TYPES else "json"
        return json.dumps(self.issue(assignment, pixels, predictions, "predict", input_path)[0]).encode()

    @route("POST", "/predict", responses=openapi.answers(openapi.PredictionOut), openapi_extra=openapi.SINGLE_BODY)
    async def predict(self, request: Request) -> Response:
        """One image: a PNG or JPEG body (`Content-Type: image/png` or `image/jpeg`), or JSON
        `{"pixels": 28 rows of 28 numbers 0-255}`. Images of other sizes and dark-on-light drawings are
        preprocessed the MNIST way (see the description above)."""
        body = await read_body(request.receive, request.headers.get("content-length"))
        answer = self.answer_predict(body, request.headers.get("content-type"), request.headers.get(CLIENT_KEY))
        return Response(answer, media_type=JSON)

    @route("POST", "/predict/batch", responses=openapi.answers(openapi.BatchOut), openapi_extra=openapi.BATCH_BODY)
    async def predict_batch(self, request: Request) -> Response:
        """Up to 256 images in one JSON body, each `{"pixels": ...}` or `{"image_base64": "<PNG or JPEG>"}`;
        answers in the same order, all from the same arm. One bad image fails the request, naming its index."""
        assignment = self.assign(request.headers.get(CLIENT_KEY))
        body = await read_body(request.receive, request.headers.get("content-length"))
        pixels, predictions = await run_in_threadpool(
            _parse_and_predict_batch, assignment, body, request.headers.get("content-type")
        )
        input_path = "upload" if b'"image_base64"' in body else "json"  # a mixed batch counts as uploads
        answers = self.issue(assignment, pixels, predictions, "predict/batch", input_path)
        return Response(json.dumps({"predictions": answers}), media_type=JSON)

    @route(
        "POST",
        "/feedback",
        status_code=202,
        responses=openapi.answers(openapi.FeedbackOut, openapi.FEEDBACK_ERRORS, status=202),
        openapi_extra=openapi.FEEDBACK_BODY,
    )
    async def feedback(self, request: Request) -> Response:
        """The true label of an earlier prediction: `{"prediction_id": "<from the answer>", "label": 0-9}`.
        Accepted (202) for an id this server issued, then written to the feedback log within seconds."""
        body = await read_body(request.receive, request.headers.get("content-length"))
        prediction_id, label = parse_feedback(body, request.headers.get("content-type"))
        issued = self.issued.get(prediction_id)
        if issued is None:
            raise InputError(
                f"unknown prediction_id {prediction_id[:64]!r}: not issued by this server (or long ago)", 404
            )
        if self.logs.feedback is not None:
            self.logs.feedback.record(FeedbackRecord(time.time(), prediction_id, label, *issued))
        answer = {"prediction_id": prediction_id, "label": label, "recorded": self.logs.feedback is not None}
        return Response(json.dumps(answer), status_code=202, media_type=JSON)

    @route("GET", "/health", responses={200: {"model": openapi.HealthOut}, 503: {"model": openapi.HealthOut}})
    async def health(self, _request: Request) -> Response:
        """200 with the model version while a model is loaded; 503 while none is. Also the challenger, the
        routing in force and the shadow's counts."""
        status = self.watcher.status()
        loaded = status["model_version"] is not None
        shadow = self.shadow.status() if self.shadow else None
        answer = {"status": "ok" if loaded else "no model", **status, "shadow": shadow}
        return Response(json.dumps(answer), status_code=200 if loaded else 503, media_type=JSON)

    @route("GET", "/", include_in_schema=False)
    async def index(self, _request: Request) -> Response:
        """The draw-a-digit page."""
        return self._static_file(page.INDEX)

    @route("GET", "/static/{name}", include_in_schema=False)
    async def static_file(self, request: Request) -> Response:
        """The page's scripts and styles (a fixed set, read when the app was built)."""
        return self._static_file(request.path_params["name"])

    def _static_file(self, name: str) -> Response:
        if name not in self.static:
            raise InputError(f"no such file: {name[:64]!r}", 404)
        content, media_type = self.static[name]
        return Response(content, media_type=media_type, headers={"Cache-Control": "no-cache"})

    def handlers(self) -> list[Callable]:
        """The methods marked with `@route` (bound), in the order the class (then subclasses) define them."""
        names = dict.fromkeys(name for cls in reversed(type(self).__mro__) for name in vars(cls))
        return [getattr(self, name) for name in names if hasattr(getattr(type(self), name, None), "route")]


def _parse_and_predict_batch(
    assignment: Assignment, body: bytes, content_type: str | None
) -> tuple[np.ndarray, list[Prediction]]:
    """`POST /predict/batch`'s CPU work, in a worker thread: the images (N, 28, 28) and their predictions."""
    pixels = service.parse_batch(body, content_type)
    return pixels, service.predict(assignment.model.predictor, pixels)


def create_app(
    store: Store,
    poll_seconds: float = 1.0,
    prediction_log: PredictionLog | None = None,
    fast_path: bool = True,
    feedback_log: FeedbackLog | None = None,
) -> FastAPI:
    """The FastAPI app of a `DigitService` over `store` (kept as `app.state.service`)."""
    logs = Logs(prediction_log, feedback_log)
    digits = DigitService(store, poll_seconds, logs)
    app = FastAPI(
        title=openapi.TITLE,
        summary=openapi.SUMMARY,
        description=openapi.description(),
        version="1",
        lifespan=digits.lifespan,
    )
    app.state.service, app.state.watcher = digits, digits.watcher
    for handler in digits.handlers():
        spec: RouteSpec = handler.route
        app.router.add_api_route(
            spec.path,
            handler,
            methods=[spec.method],
            response_model=None,
            route_class_override=DirectRoute,
            **spec.options,
        )
    for error_type in Refusal:
        app.add_exception_handler(error_type, _refusal_response)
    if fast_path:
        app.add_middleware(PredictFastPath, answer=digits.answer_predict)
    return app


async def _refusal_response(_request: Request, error: Exception) -> Response:
    status, payload = refusal(error)
    return Response(payload, status_code=status, media_type=JSON)


async def read_body(receive, declared_length: str | None) -> bytes:
    """The body from the ASGI `receive` channel, refusing more than `MAX_BODY_BYTES` (before reading,
    where the length is declared)."""
    if declared_length is not None and declared_length.isdigit() and int(declared_length) > MAX_BODY_BYTES:
        raise InputError(f"body is {int(declared_length)} bytes; the limit is {MAX_BODY_BYTES}", 413)
    chunks, size, more = [], 0, True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise InputError(f"body is over the limit of {MAX_BODY_BYTES} bytes", 413)
        chunks.append(chunk)
        more = message.get("more_body", False)
    return b"".join(chunks)


class PredictFastPath:
    """ASGI middleware that hands `POST /predict` straight to `answer` (`DigitService.answer_predict`),
    skipping routing, request and response objects and the exception middleware: the bulk of what the
    framework costs a small request. The route of the same path documents it in OpenAPI and runs the same
    `answer` when the app is built with `fast_path=False`; refusals are answered by the same `refusal`
    (the tests check both paths give the same answers)."""

    def __init__(self, app, answer: Callable[[bytes, str | None, str | None], bytes]) -> None:
        self.app, self.answer = app, answer

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != "/predict":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        content_type, length = _header(headers, b"content-type"), _header(headers, b"content-length")
        try:
            body = await read_body(receive, length)
            status, payload = 200, self.answer(body, content_type, _header(headers, CLIENT_KEY_BYTES))
        except Refusal as error:
            status, payload = refusal(error)
        except ClientDisconnect:
            return
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", JSON.encode()), (b"content-length", str(len(payload)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": payload})


CLIENT_KEY_BYTES = CLIENT_KEY.encode()


def _header(headers: dict[bytes, bytes], name: bytes) -> str | None:
    """A raw ASGI header as Starlette's `request.headers` gives it (latin-1), so both paths route alike."""
    value = headers.get(name)
    return value.decode("latin-1") if value is not None else None
