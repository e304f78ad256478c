"""The real-time endpoint as a real `mnist-dagster serve` process on 127.0.0.1, and `digit_predictions`."""

import base64
import io
import json
import struct
import zlib
from pathlib import Path

import dagster as dg
import httpx
import numpy as np
import pytest
from PIL import Image

from mnist_dagster.assets.data_assets import raw_mnist_data
from mnist_dagster.assets.prediction_assets import digit_predictions
from mnist_dagster.resources.serving import ServingEndpoint
from mnist_dagster.lifecycle import deploy
from mnist_dagster.lifecycle.record import change_record
from mnist_dagster.scoring import bundle
from mnist_dagster.serving.prediction_log import read_prediction_log
from mnist_dagster.scoring.preprocess import encode_png
from mnist_dagster.storage import LocalStore
from mnist_dagster_tests.serving_support import running_server
from mnist_dagster_tests.support import generated_digits, wait_for


@pytest.fixture
def store_dir(tmp_path) -> Path:
    return tmp_path / "store"


def health(url: str) -> httpx.Response:
    return httpx.get(f"{url}/health", timeout=5)


def post_png(url: str, png: bytes, content_type: str = "image/png") -> httpx.Response:
    return httpx.post(f"{url}/predict", content=png, headers={"Content-Type": content_type}, timeout=10)


def post_pixels(url: str, pixels: np.ndarray) -> httpx.Response:
    return httpx.post(f"{url}/predict", json={"pixels": pixels.tolist()}, timeout=10)


def drawing(image: np.ndarray, side: int = 84) -> np.ndarray:
    """An MNIST digit as someone would draw it: black on white, larger, off-centre."""
    digit = Image.fromarray(255 - image).resize((side, side), Image.Resampling.BILINEAR)
    canvas = Image.new("L", (side + 40, side + 20), 255)
    canvas.paste(digit, (30, 5))
    return np.asarray(canvas)


def test_503_without_a_model_then_serves_one_published_later_without_restart(store_dir, generated_bundle):
    with running_server(store_dir) as url:
        response = health(url)
        assert response.status_code == 503
        assert response.json()["status"] == "no model"
        refused = post_png(url, encode_png(generated_digits(1, seed=1)[0][0]))
        assert refused.status_code == 503
        assert "no model loaded" in refused.json()["detail"]

        deploy.make_production(LocalStore(store_dir), generated_bundle, "test")
        served = wait_for(lambda: health(url).status_code == 200 and health(url).json(), message="the model to load")
        assert served["model_version"] == generated_bundle.version


@pytest.mark.slow  # 5 s or more on two cores (a pipeline, a server, a subprocess): left out of the edit loop
def test_predicts_real_digits_as_png_json_drawings_and_batches(store_dir, real_bundle, real_digits):
    images, labels = real_digits
    deploy.make_production(LocalStore(store_dir), real_bundle, "test")
    with running_server(store_dir) as url:
        assert health(url).json()["model_version"] == real_bundle.version
        answers = [post_png(url, encode_png(image)).json() for image in images[:200]]
        digits = np.array([answer["digit"] for answer in answers])
        assert np.mean(digits == labels[:200]) >= real_bundle.manifest["test_accuracy"] - 0.03
        first = answers[0]
        assert set(first) == {"digit", "confidence", "probabilities", "model_version", "prediction_id", "arm"}
        assert first["model_version"] == real_bundle.version and first["arm"] == "production"
        assert len(first["probabilities"]) == 10 and abs(sum(first["probabilities"]) - 1) < 1e-3
        assert first["confidence"] == max(first["probabilities"])

        as_json = [post_pixels(url, image).json()["digit"] for image in images[:50]]
        assert as_json == digits[:50].tolist()  # the same pixels give the same answer either way

        drawn = [post_png(url, encode_png(drawing(image))).json()["digit"] for image in images[200:260]]
        assert np.mean(np.array(drawn) == labels[200:260]) >= 0.85

        jpeg = io.BytesIO()
        Image.fromarray(drawing(images[300])).convert("RGB").save(jpeg, format="JPEG", quality=90)
        assert post_png(url, jpeg.getvalue(), "image/jpeg").json()["digit"] == labels[300]

        items = [
            {"pixels": images[i].tolist()}
            if i % 2
            else {"image_base64": base64.b64encode(encode_png(images[i])).decode()}
            for i in range(20)
        ]
        batch = httpx.post(f"{url}/predict/batch", json={"images": items}, timeout=10)
        assert batch.status_code == 200
        assert [p["digit"] for p in batch.json()["predictions"]] == digits[:20].tolist()


def test_hot_swaps_new_bundles_refuses_corrupt_ones_and_logs_what_it_served(store_dir, generated_bundle):
    store = LocalStore(store_dir)
    deploy.make_production(store, generated_bundle, "test")
    images, _ = generated_digits(4, seed=21)
    served = []
    with running_server(store_dir, "--log-flush-seconds", "0.2") as url:
        served.append(post_png(url, encode_png(images[0])).json())
        assert served[-1]["model_version"] == "1"

        deploy.make_production(store, bundle.make_bundle("2", generated_bundle.onnx), "test")
        wait_for(lambda: health(url).json()["model_version"] == "2", message="version 2 to be served")
        served.append(post_png(url, encode_png(images[1])).json())
        assert served[-1]["model_version"] == "2"

        deploy.make_production(store, bundle.make_bundle("3", b"these bytes are not an ONNX model"), "test")
        refused = wait_for(lambda: health(url).json()["refused"].get("3"), message="version 3 to be refused")
        assert "does not load as a model" in refused
        manifest = bundle.make_bundle("4", generated_bundle.onnx).manifest
        bundle.store_bundle(store, bundle.Bundle("4", generated_bundle.onnx + b"\0", manifest))  # checksum fails
        change_record(store, lambda record: record.with_production("4", "test"))
        wait_for(lambda: health(url).json()["refused"].get("4"), message="version 4 to be refused")
        assert "does not match its checksum" in health(url).json()["refused"]["4"]
        assert health(url).json()["model_version"] == "2"
        served.append(post_png(url, encode_png(images[2])).json())
        assert served[-1]["model_version"] == "2"  # the old model keeps serving

        wait_for(lambda: len(read_prediction_log(store)) >= len(served), message="the prediction log")
    logged = read_prediction_log(store)
    assert [(r["model_version"], r["digit"], r["confidence"]) for r in logged] == [
        (s["model_version"], s["digit"], s["confidence"]) for s in served
    ]
    assert all(r["endpoint"] == "predict" and r["time"].endswith("+00:00") for r in logged)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def huge_png(width: int, height: int) -> bytes:
    """A valid PNG header claiming a huge image: refused before any pixel is decoded."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IEND", b"")


def json_body(value) -> bytes:
    return json.dumps(value).encode()


PIXELS = np.zeros((28, 28), int)
PIXELS[10:18, 12:16] = 200
BAD_SINGLE = [
    ("empty PNG body", "image/png", b"", 400, "empty body"),
    ("empty JSON body", "application/json", b"", 400, "empty body"),
    ("oversized body", "image/png", b"\0" * 1_000_001, 413, "limit"),
    ("not an image", "image/png", b"GIF89a not really", 400, "not a readable PNG or JPEG"),
    ("truncated PNG", "image/png", encode_png(generated_digits(1, seed=5)[0][0])[:200], 400, "corrupt or truncated"),
    ("large image", "image/png", huge_png(3000, 20), 422, "each side must be"),
    ("decompression bomb", "image/png", huge_png(50_000, 50_000), 422, "each side must be"),
    ("blank image", "image/png", encode_png(np.full((28, 28), 255, np.uint8)), 422, "blank image"),
    ("wrong content type", "text/plain", b"7", 415, "unsupported content type"),
    ("no content type", "", b"7", 415, "unsupported content type"),
    ("invalid JSON", "application/json", b'{"pixels": [', 400, "not valid JSON"),
    ("JSON not an object", "application/json", b"[1, 2]", 422, "must be an object"),
    ("unknown field", "application/json", json_body({"pixels": PIXELS.tolist(), "x": 1}), 422, "unknown field"),
    ("missing pixels", "application/json", json_body({}), 422, '{"pixels"'),
    ("wrong shape", "application/json", json_body({"pixels": PIXELS[:27].tolist()}), 422, "28 rows of 28"),
    ("flat pixels", "application/json", json_body({"pixels": PIXELS.ravel().tolist()}), 422, "28 rows of 28"),
    ("NaN", "application/json", json.dumps({"pixels": [[float("nan")] * 28] * 28}).encode(), 422, "finite number"),
    (
        "infinity",
        "application/json",
        b'{"pixels": [' + b",".join([b"[" + b",".join([b"1e999"] * 28) + b"]"] * 28) + b"]}",
        422,
        "finite number",
    ),
    ("out of range", "application/json", json_body({"pixels": (PIXELS + 100).tolist()}), 422, "between 0 and 255"),
    ("negative", "application/json", json_body({"pixels": (PIXELS - 1).tolist()}), 422, "between 0 and 255"),
    ("strings", "application/json", json_body({"pixels": [["1"] * 28] * 28}), 422, "valid number"),
    ("booleans", "application/json", json_body({"pixels": [[True] * 28] * 28}), 422, "valid number"),
    ("deep nesting", "application/json", b"[" * 100_000 + b"]" * 100_000, 400, "not valid JSON"),
]
BAD_BATCH = [
    ("no images", json_body({"images": []}), 422, "1 to 256"),
    ("too many images", json_body({"images": [{"pixels": PIXELS.tolist()}] * 257}), 422, "1 to 256"),
    ("bad item", json_body({"images": [{"pixels": PIXELS.tolist()}, {"pixels": [[300] * 28] * 28}]}), 422, "images[1]"),
    ("bad base64", json_body({"images": [{"image_base64": "***"}]}), 422, "not valid base64"),
    ("item of both kinds", json_body({"images": [{"pixels": PIXELS.tolist(), "image_base64": ""}]}), 422, "images[0]"),
]


def test_bad_input_gets_a_clear_4xx_and_the_server_keeps_serving(store_dir, generated_bundle):
    deploy.make_production(LocalStore(store_dir), generated_bundle, "test")
    with running_server(store_dir) as url, httpx.Client(base_url=url, timeout=10) as client:
        for name, content_type, body, status, phrase in BAD_SINGLE:
            headers = {"Content-Type": content_type} if content_type else {}
            response = client.post("/predict", content=body, headers=headers)
            assert (response.status_code, name) == (status, name)
            assert phrase in response.json()["detail"], (name, response.json())
        for name, body, status, phrase in BAD_BATCH:
            response = client.post("/predict/batch", content=body, headers={"Content-Type": "application/json"})
            assert (response.status_code, name) == (status, name)
            assert phrase in response.json()["detail"], (name, response.json())

        chunked = client.post(
            "/predict", content=iter([b"\0" * 600_000, b"\0" * 600_000]), headers={"Content-Type": "image/png"}
        )
        assert chunked.status_code == 413  # no Content-Length: counted while reading

        assert client.get("/health").json()["model_version"] == "1"
        good = client.post("/predict", json={"pixels": PIXELS.tolist()})
        assert good.status_code == 200 and 0 <= good.json()["digit"] <= 9
        schema = client.get("/openapi.json").json()
        assert {"/predict", "/predict/batch", "/health"} <= set(schema["paths"])
        assert {"image/png", "image/jpeg", "application/json"} <= set(
            schema["paths"]["/predict"]["post"]["requestBody"]["content"]
        )


@pytest.fixture
def with_production(dev_env, generated_bundle) -> LocalStore:
    store = LocalStore(dev_env["MNIST_DATA_DIR"])
    deploy.make_production(store, generated_bundle, "test")
    return store


def materialize_digit_predictions(resources, instance, serving_url: str = "", **config) -> dg.ExecuteInProcessResult:
    run_config = {"ops": {"digit_predictions": {"config": config}}} if config else None
    return dg.materialize(
        [raw_mnist_data, digit_predictions],
        resources={**resources, "serving_endpoint": ServingEndpoint(url=serving_url)},
        instance=instance,
        run_config=run_config,
        raise_on_error=False,
    )


def materialization_metadata(result: dg.ExecuteInProcessResult) -> dict:
    return {k: v.value for k, v in result.asset_materializations_for_node("digit_predictions")[0].metadata.items()}


def test_digit_predictions_reports_what_the_running_server_follows(
    dev_test_resources,
    dev_env,
    instance,
    generated_bundle,
):
    """The endpoint follows the deployment record by itself; digit_predictions checks it did, over HTTP."""
    with running_server(Path(dev_env["MNIST_DATA_DIR"])) as url:
        assert health(url).status_code == 503  # nothing deployed yet
        deploy.make_production(LocalStore(dev_env["MNIST_DATA_DIR"]), generated_bundle, "test")
        result = materialize_digit_predictions(dev_test_resources, instance, serving_url=url, http_check_images=20)
        assert result.success
        metadata = materialization_metadata(result)
        assert metadata["model_version"] == generated_bundle.version
        assert metadata["challenger_version"] == "none" and metadata["routing"] == "production only"
        assert metadata["http_check"] == f"{url} serves version {generated_bundle.version}"
        assert metadata["http_check_images"] == 20
        assert health(url).json()["model_version"] == generated_bundle.version


def test_digit_predictions_fails_when_the_server_does_not_pick_up_the_model(
    dev_test_resources, instance, with_production, tmp_path
):
    with running_server(tmp_path / "another-store") as url:  # serves a different store: never sees the model
        result = materialize_digit_predictions(dev_test_resources, instance, serving_url=url, http_timeout_seconds=2.0)
    assert not result.success
    message = result.get_step_failure_events()[0].step_failure_data.error.message
    assert "did not serve model version 1 within 2 s" in message
