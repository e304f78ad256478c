"""The real-time endpoint: FastAPI over the newest serving bundle in the store.

`DigitService` holds the model watcher and the prediction log; each route is one of its methods,
marked with `@route`, and `create_app` builds the FastAPI app from them. Every refusal is raised, as an
`InputError` (the client's to fix) or `NoModel`, and turned into `{"detail": ...}` with its status by
`refusal`, both by the FastAPI exception handlers and by the ASGI fast path for `POST /predict`.

Kept lean for a small CPU: the single-image endpoint is `async` and calls ONNX Runtime directly (one
image takes less time than handing it to a worker thread would), bodies are parsed by hand rather
than through pydantic, answers are serialised once with `json.dumps`, and the prediction log only
enqueues. What `/docs` and `/openapi.json` show is described in `serving/openapi.py`.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response
from fastapi.routing import APIRoute
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from mnist_dagster.layout import SERVING_ROOT
from mnist_dagster.serving import openapi, service
from mnist_dagster.serving.prediction_log import PredictionLog
from mnist_dagster.serving.preprocess import InputError
from mnist_dagster.serving.service import MAX_BODY_BYTES, LoadedModel, ModelWatcher, Prediction
from mnist_dagster.storage import Store

JSON = "application/json"
NO_MODEL_DETAIL = "no model loaded yet: materialize digit_predictions to publish the production model to this store"


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


class DigitService:
    """The service over `store`: serves the bundle `<root>/CURRENT.json` names, and follows it as it moves."""

    def __init__(
        self, store: Store, root: str, poll_seconds: float, prediction_log: PredictionLog | None = None
    ) -> None:
        self.watcher = ModelWatcher(store, root, poll_seconds)
        self.prediction_log = prediction_log

    @asynccontextmanager
    async def lifespan(self, _app: FastAPI) -> AsyncIterator[None]:
        self.watcher.start()
        if self.prediction_log:
            self.prediction_log.start()
        try:
            yield
        finally:
            self.watcher.stop()
            if self.prediction_log:
                self.prediction_log.stop()

    def model(self) -> LoadedModel:
        model = self.watcher.current
        if model is None:
            raise NoModel()
        return model

    def log(self, predictions: list[Prediction], endpoint: str) -> None:
        if self.prediction_log:
            now = time.time()
            for p in predictions:
                self.prediction_log.record(now, p.model_version, p.digit, p.confidence, endpoint)

    def answer_predict(self, body: bytes, content_type: str | None) -> bytes:
        """The JSON answer to `POST /predict`, shared by the route and the fast path; raises a refusal."""
        prediction = service.predict_request(self.model().predictor, body, content_type)
        self.log([prediction], "predict")
        return json.dumps(prediction.as_dict()).encode()

    @route("POST", "/predict", responses=openapi.answers(openapi.PredictionOut), openapi_extra=openapi.SINGLE_BODY)
    async def predict(self, request: Request) -> Response:
        """One image: a PNG or JPEG body (`Content-Type: image/png` or `image/jpeg`), or JSON
        `{"pixels": 28 rows of 28 numbers 0-255}`. Images of other sizes and dark-on-light drawings are
        preprocessed the MNIST way (see the description above)."""
        body = await read_body(request.receive, request.headers.get("content-length"))
        return Response(self.answer_predict(body, request.headers.get("content-type")), media_type=JSON)

    @route("POST", "/predict/batch", responses=openapi.answers(openapi.BatchOut), openapi_extra=openapi.BATCH_BODY)
    async def predict_batch(self, request: Request) -> Response:
        """Up to 256 images in one JSON body, each `{"pixels": ...}` or `{"image_base64": "<PNG or JPEG>"}`;
        answers in the same order. One bad image fails the request, naming its index."""
        model = self.model()
        body = await read_body(request.receive, request.headers.get("content-length"))
        predictions = await run_in_threadpool(
            service.predict_batch_request, model.predictor, body, request.headers.get("content-type")
        )
        self.log(predictions, "predict/batch")
        return Response(json.dumps({"predictions": [p.as_dict() for p in predictions]}), media_type=JSON)

    @route("GET", "/health", responses={200: {"model": openapi.HealthOut}, 503: {"model": openapi.HealthOut}})
    async def health(self, _request: Request) -> Response:
        """200 with the model version while a model is loaded; 503 while none is."""
        status = self.watcher.status()
        loaded = status["model_version"] is not None
        answer = {"status": "ok" if loaded else "no model", **status}
        return Response(json.dumps(answer), status_code=200 if loaded else 503, media_type=JSON)

    def handlers(self) -> list[Callable]:
        """The methods marked with `@route` (bound), in the order the class (then subclasses) define them."""
        names = dict.fromkeys(name for cls in reversed(type(self).__mro__) for name in vars(cls))
        return [getattr(self, name) for name in names if hasattr(getattr(type(self), name, None), "route")]


def create_app(
    store: Store,
    root: str = SERVING_ROOT,
    poll_seconds: float = 1.0,
    prediction_log: PredictionLog | None = None,
    fast_path: bool = True,
) -> FastAPI:
    """The FastAPI app of a `DigitService` over `store` (kept as `app.state.service`)."""
    digits = DigitService(store, root, poll_seconds, prediction_log)
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

    def __init__(self, app, answer: Callable[[bytes, str | None], bytes]) -> None:
        self.app, self.answer = app, answer

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != "/predict":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        content_type, length = headers.get(b"content-type"), headers.get(b"content-length")
        try:
            body = await read_body(receive, length.decode("latin-1") if length else None)
            status, payload = 200, self.answer(body, content_type.decode("latin-1") if content_type else None)
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
