"""The real-time endpoint: plain FastAPI over the newest serving bundle in the store.

`DigitService` holds the deployment watcher (production, challenger, routing: see `lifecycle/routing.py` for
the contract with the Dagster side), the logs and the shadow scorer; its route methods are ordinary FastAPI
endpoints, registered in `create_app`. Every answer names its `prediction_id`, `arm` and `model_version`;
its `prediction_id` is signed (`serving/ids.py`) so that `POST /feedback` on any replica can take the true
label of one. Predictions and labels are journaled before the answer leaves and shipped to the store
(`storage/jsonl.py`, `storage/journal.py`, `storage/shipper.py`).

One error style: every refusal is raised, as an `InputError` (the client's to fix) or `NoModel`, and
answered by one handler as `{"detail": message}` with its status; FastAPI's own (404, 405) have that shape.

Bodies are read once, under the size limit, and validated by the pydantic models of `serving/models.py`
(`model_validate_json`, in `service.parse_json`); answers are serialised once with orjson. `/openapi.json`
is generated from the same models. Kept lean for a small CPU: the single-image endpoint is `async` and calls
ONNX Runtime directly (one image takes less time than handing it to a worker thread would), the routing is a
few attribute reads, and the logs and the shadow scorer only enqueue.
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Receive, Scope, Send

from mnist_dagster.digits import IMAGE_SIDE
from mnist_dagster.layout import FEEDBACK_PREFIX, PREDICTION_LOG_PREFIX
from mnist_dagster.lifecycle.assignment import client_tag
from mnist_dagster.lifecycle.routing import Assignment, Router
from mnist_dagster.lifecycle.shadow import ShadowScorer
from mnist_dagster.lifecycle.watcher import DeploymentWatcher
from mnist_dagster.scoring.preprocess import InputError
from mnist_dagster.serving import models, page, service
from mnist_dagster.serving.feedback import FeedbackLog, FeedbackRecord
from mnist_dagster.serving.guards import FeedbackGuards
from mnist_dagster.serving.ids import IdSigner
from mnist_dagster.serving.prediction_log import PredictionLog, PredictionRecord
from mnist_dagster.serving.service import Prediction
from mnist_dagster.storage import Store
from mnist_dagster.storage.shipper import Shipper

JSON = "application/json"
NO_MODEL_DETAIL = "no model loaded yet: nothing is deployed in this store (materialize production_digit_classifier)"

class NoModel(Exception):
    """No bundle has been published to the serving location yet (or none loaded)."""

    status = 503


def json_response(content: Any, status: int = 200) -> Response:
    """`content` serialised once, by orjson (no `jsonable_encoder` walk, no response-model validation)."""
    return Response(orjson.dumps(content), status_code=status, media_type=JSON)


@dataclass
class Logs:
    """Where the service records what it did; either may be None (not recorded). `shipper` moves their
    journal to the store (None: whoever made the logs ships them)."""

    predictions: PredictionLog | None = None
    feedback: FeedbackLog | None = None
    shipper: Shipper | None = None


class DigitService:
    """The service over `store`: serves the models the deployment record names, and follows it as it moves."""

    def __init__(
        self,
        store: Store,
        poll_seconds: float,
        logs: Logs | None = None,
        guards: FeedbackGuards | None = None,
        signer: IdSigner | None = None,
    ) -> None:
        # One ONNX thread for the challenger: its shadow batches then run on the shadow scorer's own (lowered
        # priority) thread and never take more than one core from production; a single image is no slower.
        self.watcher = DeploymentWatcher(store, poll_seconds, challenger_threads=1)
        self.router = Router(self.watcher)
        self.logs = logs or Logs()
        # Without a prediction log there is nowhere to put the shadow's digits: no shadow scoring then.
        self.shadow = ShadowScorer(self.logs.predictions.record_shadow) if self.logs.predictions else None
        # Without a configured secret the ids are good for this process only (tests, the OpenAPI document).
        self.signer = signer or IdSigner(os.urandom(32))
        self.guards = guards or FeedbackGuards()  # none configured: anyone may post, no rate limit
        self.static = self.guards.page_files(page.load_static())

    @asynccontextmanager
    async def lifespan(self, _app: FastAPI) -> AsyncIterator[None]:
        # Started sinks first, sources last; stopped the other way, so the shadow's last digits reach the log.
        started = [part for part in (self.logs.shipper, self.shadow, self.watcher) if part is not None]
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
            raise NoModel(NO_MODEL_DETAIL)
        return assignment

    def issue(
        self,
        assignment: Assignment,
        pixels: np.ndarray,
        predictions: list[Prediction],
        endpoint: str,
        client_key: str | None = None,
        input_path: str | None = None,
        started: float | None = None,
    ) -> list[dict[str, Any]]:
        """The answers to `predictions`, each with a new signed `prediction_id` and its arm. Their log lines are
        journaled (one write) before this returns; a full journal drops them, counted, and still answers.
        In shadow mode the records also go to the shadow scorer, which only enqueues."""
        now, arm, images = time.time(), assignment.arm, pixels.reshape(-1, IMAGE_SIDE, IMAGE_SIDE)
        # The request's time in the server so far (parse + predict): the A/B report's p99 guardrail per arm.
        latency_ms = round((time.perf_counter() - started) * 1000, 3) if started is not None else None
        client = client_tag(client_key) if client_key else None  # the A/B report counts clients, not requests
        answers, records = [], []
        for image, p in zip(images, predictions):
            prediction_id = self.signer.mint(p.model_version, arm, p.digit, now)
            answers.append({**p.as_dict(), "prediction_id": prediction_id, "arm": arm})
            records.append(PredictionRecord(now, prediction_id, arm, p.model_version, p.digit, p.confidence, endpoint,
                                            image, client=client, input=input_path, latency_ms=latency_ms))  # fmt: skip
        journaled = self.logs.predictions is not None and self.logs.predictions.record_many(records)
        if journaled and assignment.shadow is not None and self.shadow is not None:
            self.shadow.submit(assignment.shadow, images, records)
        return answers

    async def predict(self, request: Request) -> Response:
        """One image: a PNG or JPEG body (`Content-Type: image/png` or `image/jpeg`), or JSON
        `{"pixels": 28 rows of 28 numbers 0-255}`. Images of other sizes and dark-on-light drawings are
        preprocessed the MNIST way (see the description above)."""
        body, content_type = await read_body(request), request.headers.get("content-type")
        started, client_key = time.perf_counter(), request.headers.get(models.CLIENT_KEY_HEADER)
        assignment = self.assign(client_key)
        pixels, predictions = service.predict_request(assignment.model.predictor, body, content_type)
        input_path = "upload" if service.media_type(content_type) in service.IMAGE_TYPES else "json"
        answers = self.issue(assignment, pixels, predictions, "predict", client_key, input_path, started)
        return json_response(answers[0])

    async def predict_batch(self, request: Request) -> Response:
        """Up to 256 images in one JSON body, each `{"pixels": ...}` or `{"image_base64": "<PNG or JPEG>"}`;
        answers in the same order, all from the same arm. One bad image fails the request, naming its index."""
        body = await read_body(request)  # first: a body over the limit is a 413 before any 503
        started, client_key = time.perf_counter(), request.headers.get(models.CLIENT_KEY_HEADER)
        assignment = self.assign(client_key)
        pixels, predictions = await run_in_threadpool(
            service.predict_batch_request, assignment.model.predictor, body, request.headers.get("content-type")
        )
        input_path = "upload" if b'"image_base64"' in body else "json"  # a mixed batch counts as uploads
        answers = self.issue(assignment, pixels, predictions, "predict/batch", client_key, input_path, started)
        return json_response({"predictions": answers})

    async def feedback(self, request: Request) -> Response:
        """The true label of an earlier prediction: `{"prediction_id": "<from the answer>", "label": 0-9}`.
        Accepted (202) for an id any replica issued, once journaled; 404 for an id no replica made, 410 past
        the feedback TTL, 503 while the journal is full (the store unreachable for long)."""
        client = self.guards.admit(request)  # 401 without the token, 429 past the rate limit (serving/guards.py)
        body = await read_body(request)
        feedback = service.parse_json(models.FeedbackIn, body, request.headers.get("content-type"))
        prediction_id, label, now = feedback.prediction_id, feedback.label, time.time()
        issued = self.signer.verify(prediction_id, now)
        record = FeedbackRecord(now, prediction_id, label, issued.arm, issued.model_version, client=client)
        if self.logs.feedback is not None and not self.logs.feedback.record(record):
            raise InputError("the feedback journal is full (the store is unreachable): try again later", 503)
        answer = {"prediction_id": prediction_id, "label": label, "recorded": self.logs.feedback is not None}
        return json_response(answer, 202)

    async def health(self) -> Response:
        """200 with the model version while a model is loaded; 503 while none is. Also the challenger, the
        routing in force and the shadow's counts."""
        status = self.watcher.status()
        loaded = status["model_version"] is not None
        shadow = self.shadow.status() if self.shadow else None
        answer = {"status": "ok" if loaded else "no model", **status, "shadow": shadow}
        if self.logs.shipper is not None:
            journal = self.logs.shipper.status()
            refused = journal.pop("refused")
            journal["dropped_predictions"] = refused.get(PREDICTION_LOG_PREFIX, 0)
            journal["refused_feedback"] = refused.get(FEEDBACK_PREFIX, 0)
            answer["journal"] = journal
        return json_response(answer, 200 if loaded else 503)

    async def index(self) -> Response:
        """The draw-a-digit page."""
        return self.static_file(page.INDEX)

    def static_file(self, name: str) -> Response:
        """The page's scripts and styles (a fixed set, read when the app was built)."""
        if name not in self.static:
            raise InputError(f"no such file: {name[:64]!r}", 404)
        content, media_type = self.static[name]
        return Response(content, media_type=media_type, headers={"Cache-Control": "no-cache"})


async def read_body(request: Request) -> bytes:
    """The body, refusing more than `models.MAX_BODY_BYTES` with a 413 in the one error style: before reading where
    the length is declared, while reading where it is not. (FastAPI's own `max_body_size` answers a declared
    length over the limit in plain text, whatever the app's handlers say.)"""
    declared = request.headers.get("content-length")
    limit = models.MAX_BODY_BYTES
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise InputError(f"body is {int(declared)} bytes; the limit is {limit}", 413)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise InputError(f"body is over the limit of {limit} bytes", 413)
        chunks.append(chunk)
    return b"".join(chunks)


# ----- the app ---------------------------------------------------------------------------------------------


class PredictFastPath:
    """`POST /predict` handed straight to `DigitService.predict`, past FastAPI's routing and request plumbing.

    The one fast path the endpoint keeps: the single-image prediction is the hot route, and plain routing
    measured at 2.6-3.2x `mlflow models serve` at p50 (median 2.8x over six runs), on the line of the 3x floor
    (docs/benchmarks.md). The route stays registered, so `/openapi.json` still comes from the pydantic models;
    the answers and the one error style are the same (`_refusal`, `_gone`).
    """

    def __init__(self, app: ASGIApp, service: DigitService) -> None:
        self.app, self.service = app, service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != "/predict" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        request = Request(scope, receive)
        try:
            response = await self.service.predict(request)
        except (InputError, NoModel, ClientDisconnect) as error:
            response = await (_gone if isinstance(error, ClientDisconnect) else _refusal)(request, error)
        await response(scope, receive, send)



def create_app(
    store: Store,
    poll_seconds: float = 1.0,
    logs: Logs | None = None,
    guards: FeedbackGuards | None = None,
    signer: IdSigner | None = None,
) -> FastAPI:
    """The FastAPI app of a `DigitService` over `store` (kept as `app.state.service`)."""
    digits = DigitService(store, poll_seconds, logs, guards, signer)
    app = FastAPI(
        title=models.TITLE,
        summary=models.SUMMARY,
        description=models.description(),
        version="1",
        lifespan=digits.lifespan,
    )
    app.state.service = digits
    image = models.IMAGE_FILE
    app.post(
        "/predict",
        response_model=models.PredictionOut,
        responses=models.PREDICT_REFUSALS,
        openapi_extra=models.request_body({"image/png": image, "image/jpeg": image, JSON: models.PixelsIn}, client_key=True),
    )(digits.predict)
    app.post(
        "/predict/batch",
        response_model=models.BatchOut,
        responses=models.PREDICT_REFUSALS,
        openapi_extra=models.request_body({JSON: models.BatchIn}, client_key=True),
    )(digits.predict_batch)
    app.post(
        "/feedback",
        status_code=202,
        response_model=models.FeedbackOut,
        responses=models.FEEDBACK_REFUSALS,
        openapi_extra=models.request_body({JSON: models.FeedbackIn}),
    )(digits.feedback)
    app.get("/health", response_model=models.HealthOut, responses={503: {"model": models.HealthOut}})(digits.health)
    app.get("/", include_in_schema=False)(digits.index)
    app.get("/static/{name}", include_in_schema=False)(digits.static_file)
    app.add_exception_handler(InputError, _refusal)
    app.add_exception_handler(NoModel, _refusal)
    app.add_exception_handler(ClientDisconnect, _gone)
    app.openapi = models.with_request_schemas(app)
    app.add_middleware(PredictFastPath, service=digits)
    return app


async def _refusal(_request: Request, error: Exception) -> Response:
    """The one error style: `{"detail": message}` with the status, for every refused request."""
    return json_response({"detail": str(error)}, error.status)


async def _gone(_request: Request, _error: Exception) -> Response:
    """A client that hung up mid-body: nobody reads the answer, and it is no server error either."""
    return json_response({"detail": "the client disconnected before sending the whole body"}, 400)
