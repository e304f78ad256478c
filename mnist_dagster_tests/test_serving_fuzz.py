"""Fuzzing the endpoint: no input, however odd, gets a 5xx or anything but a clear 4xx or a prediction.

Schemathesis drives the real server from its own OpenAPI schema (valid and invalid bodies for every
operation and content type); Hypothesis drives the request-parsing functions directly, much faster,
with random bytes, random JSON, and real PNGs of random sizes and pixel modes.
"""

import io
import json
import os
import socket
import tempfile

import numpy as np
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from mnist_dagster.lifecycle import deploy
from mnist_dagster.scoring import bundle
from mnist_dagster.scoring.preprocess import InputError, mnist_format, mnist_format_many
from mnist_dagster.serving import models, service
from mnist_dagster.storage import LocalStore
from mnist_dagster_tests.serving_support import generated_model, running_server

# Fresh random examples on every local run; a fixed sequence in CI, so a landing never hangs on luck.
FUZZ = settings(
    max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), derandomize=os.environ.get("CI") == "true"
)


@pytest.fixture(scope="module")
def live_url(tmp_path_factory):
    store_dir = tmp_path_factory.mktemp("fuzz") / "store"
    deploy.make_production(LocalStore(store_dir), generated_model(), "test")
    with running_server(store_dir) as url:
        yield url


def _served_schema() -> dict:
    """The OpenAPI document the server publishes at /openapi.json (the app is built, never started).

    Loaded at import rather than from the live server through `schemathesis.pytest.from_fixture`,
    which fails on pytest 9 (`'Function' object has no attribute '_nodeid'`, schemathesis 4.32).
    """
    from mnist_dagster.serving.app import create_app

    return create_app(LocalStore(tempfile.gettempdir())).openapi()


schema = schemathesis.openapi.from_dict(_served_schema())


def test_the_schema_documents_every_route_its_bodies_and_its_refusals():
    """What the fuzzing below trusts: every route is in the schema, with the content types the parser
    accepts and every status the server can answer, each error in the `{"detail": ...}` shape."""
    from fastapi.routing import APIRoute

    from mnist_dagster.serving.app import create_app

    app = create_app(LocalStore(tempfile.gettempdir()))
    routes = [route for route in app.routes if isinstance(route, APIRoute) and route.include_in_schema]
    served = {(route.path, method.lower()) for route in routes for method in route.methods}
    paths = _served_schema()["paths"]
    assert served == {(path, method) for path, operations in paths.items() for method in operations}
    assert served >= {("/predict", "post"), ("/predict/batch", "post"), ("/feedback", "post"), ("/health", "get")}

    accepted = service.IMAGE_TYPES | {service.JSON_TYPE}
    single, batch = paths["/predict"]["post"], paths["/predict/batch"]["post"]
    assert set(single["requestBody"]["content"]) == {"image/png", "image/jpeg", "application/json"} <= accepted
    assert set(batch["requestBody"]["content"]) == {"application/json"}
    refusals = {"400", "413", "415", "422", "503"}  # InputError statuses (body, size, type, content), NoModel
    for operation in (single, batch):
        assert set(operation["responses"]) == {"200"} | refusals
        for status in refusals:
            error = operation["responses"][status]["content"]["application/json"]["schema"]
            assert error == {"$ref": "#/components/schemas/ErrorOut"}
    assert set(paths["/health"]["get"]["responses"]) == {"200", "503"}
    feedback = paths["/feedback"]["post"]
    assert set(feedback["requestBody"]["content"]) == {"application/json"}
    # 404: an id never issued, 410: past the TTL, 503: the journal full; 401 and 429: the optional token and the
    # rate limit (serving/guards.py)
    assert set(feedback["responses"]) == {"202", "400", "401", "404", "410", "413", "415", "422", "429", "503"}


def test_the_request_schemas_are_the_models_the_server_validates_with():
    """The JSON bodies the fuzzing generates are described by the very pydantic models the routes call
    `model_validate_json` on, not by a document written beside them."""
    document = _served_schema()
    bodies = {
        path: operations["post"]["requestBody"]["content"]["application/json"]["schema"]
        for path, operations in document["paths"].items()
        if "post" in operations
    }
    assert bodies == {
        "/predict": {"$ref": "#/components/schemas/PixelsIn"},
        "/predict/batch": {"$ref": "#/components/schemas/BatchIn"},
        "/feedback": {"$ref": "#/components/schemas/FeedbackIn"},
    }
    for model in models.REQUEST_MODELS:
        generated = model.model_json_schema(ref_template="#/components/schemas/{model}")
        generated.pop("$defs", None)
        assert document["components"]["schemas"][model.__name__] == generated, model.__name__
    pixels = document["components"]["schemas"]["PixelsIn"]
    assert pixels["additionalProperties"] is False and pixels["properties"]["pixels"]["maxItems"] == 28


@schema.parametrize()
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
def test_generated_requests_never_get_a_server_error(case, live_url):
    response = case.call(base_url=live_url, timeout=30)
    case.validate_response(
        response,
        checks=[
            not_a_server_error,
            status_code_conformance,  # only documented statuses
            content_type_conformance,
            response_schema_conformance,  # answers (errors too) have the documented shape
            negative_data_rejection,  # bodies that break the schema are refused
        ],
    )


def _disconnect_mid_body(url: str, path: str) -> None:
    """A client that announces a body, sends a little of it and hangs up."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as connection:
        head = f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: 100000"
        connection.sendall(head.encode() + b'\r\n\r\n{"pixels": [[0, ')


def test_hostile_requests_leave_the_server_healthy_and_answering_as_before(live_url):
    """Self-contained (whether or not the fuzzing ran first): abuse the server, then ask it again."""
    import httpx

    digit = np.zeros((28, 28), int)
    digit[6:22, 12:16] = 255
    with httpx.Client(base_url=live_url, timeout=30) as client:
        before = client.post("/predict", json={"pixels": digit.tolist()})
        assert before.status_code == 200
        for path in ("/predict", "/predict/batch", "/feedback"):
            _disconnect_mid_body(live_url, path)
            hostile = [
                (iter([b"\0" * 700_000] * 2), "application/json"),  # chunked, over the limit
                (b"[" * 100_000 + b"]" * 100_000, "application/json"),  # nesting deeper than the parser goes
                (os.urandom(5000), "image/png"),
                (b'{"pixels": [', "application/json"),
                (json.dumps({"images": [{"pixels": digit.tolist()}] * 300}).encode(), "application/json"),
            ]
            for body, content_type in hostile:
                response = client.post(path, content=body, headers={"Content-Type": content_type})
                assert 400 <= response.status_code < 500 and response.json()["detail"], (path, response.text)
        assert client.get("/health").json()["status"] == "ok"
        after = client.post("/predict", json={"pixels": digit.tolist()}).json()
        assert after.pop("prediction_id") != before.json()["prediction_id"]  # a new id for every answer
        assert after == {k: v for k, v in before.json().items() if k != "prediction_id"}


@pytest.fixture(scope="module")
def predictor():
    return bundle.Predictor(generated_model())


def assert_prediction_or_client_error(predictor, body: bytes, content_type: str, batch: bool = False) -> None:
    """The property the server relies on: a valid answer, or `InputError` with a 4xx status."""
    try:
        request = service.predict_batch_request if batch else service.predict_request
        _, results = request(predictor, body, content_type)
    except InputError as error:
        assert 400 <= error.status < 500 and str(error)
        return
    for prediction in results:
        assert 0 <= prediction.digit <= 9
        assert len(prediction.probabilities) == 10 and abs(sum(prediction.probabilities) - 1) < 1e-3
        assert np.isfinite(prediction.probabilities).all()


CONTENT_TYPES = st.sampled_from(
    ["image/png", "image/jpeg", "application/json", "text/plain", "", "application/json; charset=utf-8"]
)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=5),
    lambda children: (
        st.lists(children, max_size=30)
        | st.dictionaries(st.sampled_from(["pixels", "images", "image_base64", "x"]), children, max_size=3)
    ),
    max_leaves=900,
)


@FUZZ
@given(body=st.binary(max_size=3000), content_type=CONTENT_TYPES, batch=st.booleans())
def test_random_bytes(predictor, body, content_type, batch):
    assert_prediction_or_client_error(predictor, body, content_type, batch)


@FUZZ
@given(value=JSON_VALUES, batch=st.booleans())
def test_random_json(predictor, value, batch):
    assert_prediction_or_client_error(predictor, json.dumps(value).encode(), "application/json", batch)


PIXEL_VALUES = st.one_of(
    st.integers(-5, 300), st.floats(-1, 260), st.sampled_from([0.0, 255.0, float("nan"), float("inf"), -float("inf")])
)


@FUZZ
@given(
    grid=arrays(np.float64, (28, 28), elements=PIXEL_VALUES),
    reshape=st.sampled_from(["as is", "as is", "as is", "drop a row", "add a column"]),
)
def test_nearly_valid_pixels(predictor, grid, reshape):
    rows = grid.tolist()
    if reshape == "drop a row":
        rows = rows[1:]
    elif reshape == "add a column":
        rows[3].append(0)
    body = json.dumps({"pixels": rows}).encode()
    assert_prediction_or_client_error(predictor, body, "application/json")
    well_formed = reshape == "as is" and np.isfinite(grid).all() and grid.min() >= 0 and grid.max() <= 255
    if well_formed and np.ptp(grid) > 0:  # valid and not constant: answered, or refused only as blank
        try:  # (a light image whose every pixel is as light as its border has no ink: blank by the MNIST recipe)
            service.predict_request(predictor, body, "application/json")
        except InputError as error:
            assert "blank image" in str(error), error


MODES = st.sampled_from(["L", "RGB", "RGBA", "LA", "P", "1", "I;16", "I"])


@FUZZ
@given(
    pixels=arrays(np.uint8, st.tuples(st.integers(1, 80), st.integers(1, 80))),
    mode=MODES,
    image_format=st.sampled_from(["PNG", "JPEG"]),
    cut=st.one_of(st.none(), st.integers(0, 400)),
)
def test_real_images_of_any_size_and_mode(predictor, pixels, mode, image_format, cut):
    image = Image.fromarray(pixels)
    if mode in {"I;16", "I"}:
        image = Image.fromarray(pixels.astype(np.uint16) * 257)
        image_format = "PNG"
    elif mode != "L":
        image = image.convert(mode)
    if image_format == "JPEG" and mode not in {"L", "RGB"}:
        image = image.convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, format=image_format)
    body = buffer.getvalue() if cut is None else buffer.getvalue()[:cut]
    assert_prediction_or_client_error(predictor, body, f"image/{image_format.lower()}")


@FUZZ
@given(pixels=arrays(np.uint8, st.tuples(st.integers(1, 120), st.integers(1, 120))))
def test_the_mnist_recipe_gives_a_centred_28x28_image_or_refuses_a_blank_one(pixels):
    try:
        out = mnist_format(pixels.astype(np.float32))
    except InputError as error:
        assert "blank" in str(error)
        return
    assert out.shape == (28, 28) and out.dtype == np.float32
    assert np.isfinite(out).all() and out.min() >= 0 and out.max() <= 1 and out.max() > 0


@FUZZ
@given(
    images=arrays(
        np.uint8,
        st.tuples(st.integers(1, 12), st.just(28), st.just(28)),
        elements=st.sampled_from([0, 30, 128, 200, 255]),
    )
)
def test_the_batch_preprocessing_matches_the_single_image_path(images):
    batched, refused = mnist_format_many(images)
    for index, image in enumerate(images):
        try:
            single = mnist_format(image.astype(np.float32))
        except InputError as error:
            assert refused[index] == str(error)
            continue
        assert index not in refused
        np.testing.assert_array_equal(batched[index, 0], single)
