"""`POST /predict` answers the same through the ASGI fast path as through the documented FastAPI route
(answer for answer, but for the `prediction_id` every answer gets anew)."""

import functools
import io
import json

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from mnist_dagster.lifecycle.record import Routing, Strategy
from mnist_dagster.lifecycle import deploy
from mnist_dagster.scoring import bundle
from mnist_dagster.serving.app import DigitService, create_app
from mnist_dagster.storage import LocalStore
from mnist_dagster_tests.serving_support import generated_model
from mnist_dagster_tests.support import wait_for


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


DIGIT = np.zeros((28, 28))
DIGIT[6:22, 12:16] = 255
REQUESTS = {
    "png": (_png(DIGIT), "image/png"),
    "json": (json.dumps({"pixels": DIGIT.tolist()}).encode(), "application/json"),
    "empty": (b"", "image/png"),
    "not an image": (b"hello", "image/png"),
    "wrong content type": (b"{}", "text/plain"),
    "no content type": (b"{}", None),
    "wrong shape": (json.dumps({"pixels": [[0] * 27] * 28}).encode(), "application/json"),
    "out of range": (json.dumps({"pixels": [[300] * 28] * 28}).encode(), "application/json"),
    "oversized": (b"\x89PNG" + b"0" * 1_100_000, "image/png"),
}


@pytest.fixture
def routed(monkeypatch) -> list[str]:
    """The paths the FastAPI route `DigitService.predict` handled: the fast path must leave it idle."""
    calls: list[str] = []
    original = DigitService.predict

    @functools.wraps(original)  # keeps the `@route` mark and the signature FastAPI reads
    async def counted(self, request):
        calls.append(request.url.path)
        return await original(self, request)

    monkeypatch.setattr(DigitService, "predict", counted)
    return calls


@pytest.fixture
def clients(tmp_path, routed):
    """Two apps over one store with a published model: with and without the fast path."""
    store = LocalStore(tmp_path)
    deploy.make_production(store, generated_model("7"), "test")
    apps = {name: create_app(store, poll_seconds=0.1, fast_path=name == "fast") for name in ("fast", "route")}
    with TestClient(apps["fast"]) as fast, TestClient(apps["route"]) as route:
        for client in (fast, route):
            wait_for(lambda c=client: c.get("/health").status_code == 200, message="a model loaded")
        yield fast, route


def _post(client: TestClient, body: bytes, content_type: str | None, client_key: str | None = None):
    """(status, content type, answer without its prediction_id); the id is checked to be a fresh 32-hex one."""
    headers = {"content-type": content_type} if content_type else {}
    if client_key:
        headers["x-client-key"] = client_key
    response = client.post("/predict", content=body, headers=headers)
    payload = response.json()
    prediction_id = payload.pop("prediction_id", None)
    if response.status_code == 200:
        assert len(prediction_id) == 32 and int(prediction_id, 16) >= 0 and prediction_id not in ISSUED
        ISSUED.add(prediction_id)
    return response.status_code, response.headers["content-type"], payload


ISSUED: set[str] = set()


@pytest.mark.parametrize("name", sorted(REQUESTS))
def test_fast_path_and_route_give_the_same_answer(clients, routed, name):
    fast, route = clients
    body, content_type = REQUESTS[name]
    fast_answer = _post(fast, body, content_type)
    assert routed == []  # answered by the fast path, not by the route
    route_answer = _post(route, body, content_type)
    assert routed == ["/predict"]  # answered by the route
    assert fast_answer == route_answer
    status, _, payload = fast_answer
    if name in {"png", "json"}:
        assert status == 200 and payload["model_version"] == "7" and 0 <= payload["digit"] <= 9
        assert payload["arm"] == "production"
    else:
        assert 400 <= status < 500 and payload["detail"], payload


def test_without_a_model_both_paths_say_503(tmp_path):
    for fast in (True, False):
        with TestClient(create_app(LocalStore(tmp_path), fast_path=fast)) as client:
            response = client.post("/predict", content=REQUESTS["png"][0], headers={"content-type": "image/png"})
            assert response.status_code == 503 and "no model loaded" in response.json()["detail"]


def test_other_routes_pass_through_the_fast_path(clients):
    fast, _ = clients
    assert fast.get("/health").json()["model_version"] == "7"
    assert "/predict" in fast.get("/openapi.json").json()["paths"]


def test_both_paths_give_a_client_key_the_same_arm(tmp_path):
    """In an A/B test the fast path and the route read the `X-Client-Key` header alike: same key, same arm."""
    store = LocalStore(tmp_path)
    deploy.make_production(store, generated_model("7"), "test")
    deploy.start_trial(store, bundle.make_bundle("8", generated_model("7").onnx), Routing(Strategy.ab_test, 0.5))
    apps = [create_app(store, poll_seconds=0.1, fast_path=fast) for fast in (True, False)]
    with TestClient(apps[0]) as fast, TestClient(apps[1]) as route:
        for client in (fast, route):
            wait_for(lambda c=client: c.get("/health").json()["challenger_version"] == "8", message="the challenger")
        body, content_type = REQUESTS["png"]
        for key in (f"client-{i}" for i in range(20)):
            assert _post(fast, body, content_type, key) == _post(route, body, content_type, key), key
        arms = {_post(fast, body, content_type, f"client-{i}")[2]["arm"] for i in range(20)}
        assert arms == {"production", "challenger"}  # these 20 keys hash to both sides of a half share
