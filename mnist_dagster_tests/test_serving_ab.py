"""Champion vs challenger on a real `mnist-dagster serve`: replace, A/B test and shadow, switched at run time
through the deployment record; every answer and log line names its prediction, arm and model version, and the
log keeps the image the model saw. The contract is in `mnist_dagster/lifecycle/routing.py`."""

from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import pytest

from mnist_dagster.layout import DEPLOYMENT_KEY
from mnist_dagster.lifecycle import deploy
from mnist_dagster.lifecycle.assignment import client_share, client_tag
from mnist_dagster.lifecycle.record import Routing, Strategy, change_record, read_record
from mnist_dagster.lifecycle.routing import Router
from mnist_dagster.lifecycle.watcher import Deployment, LoadedModel
from mnist_dagster.scoring import bundle
from mnist_dagster.scoring.preprocess import decode_image, encode_png, mnist_format
from mnist_dagster.serving.prediction_log import logged_image, read_prediction_log
from mnist_dagster.storage import LocalStore
from mnist_dagster_tests.serving_support import generated_model, running_server, untrained_bundle
from mnist_dagster_tests.support import generated_digits, wait_for

POLL_SECONDS = 1.0  # the server's default
LINE_KEYS = {
    "time", "prediction_id", "arm", "model_version", "digit", "confidence", "endpoint", "input", "latency_ms", "image",
}  # fmt: skip
ANSWER_KEYS = {"digit", "confidence", "probabilities", "model_version", "prediction_id", "arm"}


@pytest.fixture(scope="module")
def challenger() -> bundle.Bundle:
    """A model that answers differently from production (random weights), so the shadow's digits are its own."""
    return bundle.make_bundle("2", untrained_bundle("2", claimed_accuracy=0.5).onnx)


@pytest.fixture(scope="module")
def server(tmp_path_factory, challenger):
    """One server for the module: production "1" deployed, challenger "2" stored (on trial as each test says)."""
    store_dir = tmp_path_factory.mktemp("ab") / "store"
    store = LocalStore(store_dir)
    deploy.make_production(store, generated_model("1"), "test")
    bundle.store_bundle(store, challenger)
    with running_server(store_dir, "--log-flush-seconds", "0.2", poll_seconds=POLL_SECONDS) as url:
        wait_for(lambda: health(url)["model_version"] == "1", timeout=60, message="production to load")
        yield SimpleNamespace(url=url, store=store)


def health(url: str) -> dict:
    return httpx.get(f"{url}/health", timeout=5).json()


def set_routing(server, strategy: str, share: float = 0.0) -> str | None:
    """Change the deployment record as the gate or the A/B report does (challenger "2" on a new trial under
    `strategy`, or none for replace); wait until /health shows it; the trial id (the arm hash's salt)."""
    if strategy == "replace":
        deploy.end_trial(server.store)
    else:
        change_record(server.store, lambda record: record.with_challenger("2", Routing(Strategy(strategy), share)))
    expected = {"strategy": strategy, "challenger_traffic": share if strategy == "ab_test" else 0.0}
    trial_id = read_record(server.store).trial_id
    wait_for(
        lambda: (s := health(server.url))["routing"] == expected and s["trial_id"] == trial_id,
        timeout=60,
        message=f"the endpoint to follow the record to {expected}",
    )
    return trial_id


def post_png(client: httpx.Client, png: bytes, key: str | None = None) -> dict:
    headers = {"Content-Type": "image/png", **({"X-Client-Key": key} if key else {})}
    response = client.post("/predict", content=png, headers=headers)
    assert response.status_code == 200, response.text
    return response.json()


def logged_lines(store: LocalStore, ids: set[str], shadowed: bool = False) -> dict[str, dict]:
    """The prediction log's lines for `ids`, once every one of them is written (`shadowed`: and the shadow's
    digit for each, which follows its prediction's line as an amendment: docs/write-path.md)."""

    def all_written() -> dict[str, dict] | None:
        lines = {line["prediction_id"]: line for line in read_prediction_log(store) if line["prediction_id"] in ids}
        complete = not shadowed or all("shadow_digit" in line for line in lines.values())
        return lines if len(lines) == len(ids) and complete else None

    return wait_for(all_written, message=f"{len(ids)} prediction log lines")


def key_in(arm: str, share: float, salt: str) -> str:
    """A client key whose salted hash puts it in `arm` at this share in this trial (the hash is the contract)."""
    keys = (f"client-{i}" for i in range(1000))
    return next(k for k in keys if (client_share(k, salt) < share) == (arm == "challenger"))


PNGS = [encode_png(image) for image in generated_digits(40, seed=7)[0]]


def test_replace_serves_only_production_and_the_endpoint_follows_each_change_of_the_record(server):
    set_routing(server, "replace")
    with httpx.Client(base_url=server.url, timeout=10) as client:
        answers = [post_png(client, png, key=f"k{i}") for i, png in enumerate(PNGS)]
        assert {(a["arm"], a["model_version"]) for a in answers} == {("production", "1")}

        set_routing(server, "ab_test", 1.0)
        assert {post_png(client, png)["model_version"] for png in PNGS[:10]} == {"2"}

        set_routing(server, "replace")
        assert {post_png(client, png)["arm"] for png in PNGS[:10]} == {"production"}

        good = server.store.read_bytes(DEPLOYMENT_KEY)
        server.store.write_bytes(DEPLOYMENT_KEY, b'{"format": "mnist-dagster/deployment-v1", "share": 7}')
        wait_for(lambda: "cannot read the deployment record" in (health(server.url)["routing_note"] or ""),
                 timeout=60, message="the bad record noted")  # fmt: skip
        assert health(server.url)["routing"]["strategy"] == "replace"  # what was in force keeps serving
        assert {post_png(client, png)["arm"] for png in PNGS[:10]} == {"production"}
        server.store.write_bytes(DEPLOYMENT_KEY, good)
        wait_for(lambda: health(server.url)["routing_note"] is None, timeout=60, message="the record read again")


def test_ab_test_same_key_same_arm_and_keyless_traffic_near_the_share(server):
    trial_id = set_routing(server, "ab_test", 0.1)
    with httpx.Client(base_url=server.url, timeout=10) as client:
        for arm, version in (("challenger", "2"), ("production", "1")):
            key = key_in(arm, 0.1, trial_id)
            answers = [post_png(client, PNGS[i % len(PNGS)], key) for i in range(200)]
            assert {(a["arm"], a["model_version"]) for a in answers} == {(arm, version)}, key
            batch = client.post(
                "/predict/batch",
                json={"images": [{"pixels": image.tolist()} for image in generated_digits(5, seed=3)[0]]},
                headers={"X-Client-Key": key},
            ).json()["predictions"]
            assert {(p["arm"], p["model_version"]) for p in batch} == {(arm, version)}
            assert len({p["prediction_id"] for p in batch}) == 5
            lines = logged_lines(server.store, {a["prediction_id"] for a in answers[:10] + batch})
            assert {line["client"] for line in lines.values()} == {client_tag(key)}  # the A/B report's unit
        keyless = [post_png(client, PNGS[i % len(PNGS)])["arm"] for i in range(400)]
    share = keyless.count("challenger") / len(keyless)
    assert 0.04 <= share <= 0.17, share  # 400 draws at 0.1: sd 1.5 points; these bounds are over 4 sd


def test_the_router_splits_10000_requests_within_a_point_and_a_half_of_the_share():
    """In process, through the very function the endpoint calls: keyless random draws, and distinct keys."""
    production = LoadedModel(SimpleNamespace(version="1"), "t0")
    challenger = LoadedModel(SimpleNamespace(version="2"), "t0")
    watcher = SimpleNamespace(current=Deployment(production, challenger, Routing(Strategy.ab_test, 0.1), "trial-1"))
    router = Router(watcher)
    keyless = sum(router.choose(None).arm == "challenger" for _ in range(10_000)) / 10_000
    keyed = sum(router.choose(f"user-{i}").arm == "challenger" for i in range(10_000)) / 10_000
    assert abs(keyless - 0.1) <= 0.015 and abs(keyed - 0.1) <= 0.015, (keyless, keyed)
    assert all(router.choose("user-7") is router.choose("user-7") for _ in range(100))
    for strategy in (Strategy.replace, Strategy.shadow):
        watcher.current = Deployment(production, challenger, Routing(strategy), "trial-1")
        assert {router.choose(None).arm for _ in range(1000)} == {"production"}
    assert router.choose(None).shadow is challenger
    watcher.current = Deployment(production, None, Routing(Strategy.ab_test, 1.0), "trial-1")  # not loaded
    assert router.choose("anyone").arm == "production" and router.choose(None).shadow is None


def test_the_arm_hash_is_sticky_within_a_trial_and_drawn_afresh_for_each_trial():
    """Through the Router: a client keeps its arm for the whole trial; the next trial (a new id, the salt)
    draws its audience independently, so two trials agree on a client's arm with probability
    share^2 + (1 - share)^2 (0.82 at 0.1), not 1, and share 0.1 clients see both challengers 1% of the time."""
    production = LoadedModel(SimpleNamespace(version="1"), "t0")
    challenger = LoadedModel(SimpleNamespace(version="2"), "t0")
    keys = [f"user-{i}" for i in range(20_000)]

    def audience(trial_id: str) -> np.ndarray:
        deployment = Deployment(production, challenger, Routing(Strategy.ab_test, 0.1), trial_id)
        router = Router(SimpleNamespace(current=deployment))
        return np.array([router.choose(key).arm == "challenger" for key in keys])

    first, again, second = audience("trial-a"), audience("trial-a"), audience("trial-b")
    assert (first == again).all()
    assert abs(first.mean() - 0.1) <= 0.01 and abs(second.mean() - 0.1) <= 0.01
    assert abs((first == second).mean() - (0.1**2 + 0.9**2)) <= 0.01
    assert abs((first & second).mean() - 0.01) <= 0.003


def test_shadow_answers_from_production_and_logs_the_challengers_digit(server, challenger):
    set_routing(server, "shadow")
    images, _ = generated_digits(30, seed=11)
    with httpx.Client(base_url=server.url, timeout=10) as client:
        answers = [post_png(client, encode_png(image), key=f"k{i}") for i, image in enumerate(images)]
        batch = client.post("/predict/batch", json={"images": [{"pixels": image.tolist()} for image in images[:8]]})
        answers += batch.json()["predictions"]
    assert {(a["arm"], a["model_version"]) for a in answers} == {("production", "1")}
    lines = logged_lines(server.store, {a["prediction_id"] for a in answers}, shadowed=True)
    expected = bundle.Predictor(challenger).predict_proba(np.concatenate([images, images[:8]])[:, None] / 255)
    for index, (answer, challenger_digit) in enumerate(zip(answers, expected.argmax(axis=1))):
        line = lines[answer["prediction_id"]]
        keyed = {"client"} if index < len(images) else set()  # the PNGs came with a client key, the batch without
        assert set(line) == LINE_KEYS | {"shadow_digit", "shadow_version"} | keyed
        assert (line["arm"], line["model_version"], line["digit"]) == ("production", "1", answer["digit"])
        assert (line["shadow_version"], line["shadow_digit"]) == ("2", int(challenger_digit))
    assert any(line["shadow_digit"] != line["digit"] for line in lines.values())  # really the challenger's answers
    assert health(server.url)["shadow"]["scored"] >= len(answers)


def drawing(image: np.ndarray) -> np.ndarray:
    """Black on white, larger and off-centre: preprocessing really changes it."""
    from PIL import Image

    canvas = Image.new("L", (120, 100), 255)
    canvas.paste(Image.fromarray(255 - image).resize((70, 70)), (35, 10))
    return np.asarray(canvas)


def test_every_answer_and_log_line_names_its_prediction_and_keeps_the_image_the_model_saw(server):
    set_routing(server, "ab_test", 0.5)
    images, _ = generated_digits(12, seed=13)
    pngs = [encode_png(drawing(image)) for image in images[:6]]
    with httpx.Client(base_url=server.url, timeout=10) as client:
        answers = [post_png(client, png) for png in pngs]
        answers.append(client.post("/predict", json={"pixels": images[6].tolist()}).json())
        answers += client.post(
            "/predict/batch", json={"images": [{"pixels": image.tolist()} for image in images[7:]]}
        ).json()["predictions"]
    assert all(set(answer) == ANSWER_KEYS for answer in answers)
    assert len({answer["prediction_id"] for answer in answers}) == len(answers)
    lines = logged_lines(server.store, {a["prediction_id"] for a in answers})
    seen = [mnist_format(decode_image(png)) for png in pngs] + [image / 255 for image in images[6:]]
    endpoints = ["predict"] * 7 + ["predict/batch"] * 5
    inputs = ["upload"] * 6 + ["json"] * 6  # six PNGs, then JSON pixels alone and in a batch
    for answer, pixels, endpoint, path in zip(answers, seen, endpoints, inputs):
        line = lines[answer["prediction_id"]]
        assert set(line) == LINE_KEYS and (line["endpoint"], line["input"]) == (endpoint, path)
        assert line["latency_ms"] > 0  # the request's time in the server: the A/B report's p99 guardrail
        assert {k: line[k] for k in ("arm", "model_version", "digit", "confidence")} == {
            k: answer[k] for k in ("arm", "model_version", "digit", "confidence")
        }
        assert line["model_version"] == {"production": "1", "challenger": "2"}[line["arm"]]
        np.testing.assert_array_equal(logged_image(line["image"]), np.rint(pixels * 255).astype(np.uint8))
    assert all(len(line["image"]) == 1048 for line in lines.values())  # base64 of 784 bytes


def test_health_names_the_challenger_and_the_routing_in_force(server):
    trial_id = set_routing(server, "ab_test", 0.25)
    status = health(server.url)
    assert status["model_version"] == "1" and status["challenger_version"] == "2" and status["trial_id"] == trial_id
    assert status["routing"] == {"strategy": "ab_test", "challenger_traffic": 0.25} and status["routing_note"] is None
    assert status["challenger_refused"] == {} and set(status["shadow"]) == {"queued", "scored", "dropped", "failed"}


def test_a_refused_challenger_leaves_production_answering_everything(tmp_path: Path):
    store = LocalStore(tmp_path / "store")
    deploy.make_production(store, generated_model("1"), "test")
    deploy.start_trial(store, bundle.make_bundle("9", b"not an ONNX model"), Routing(Strategy.ab_test, 1.0))
    with running_server(tmp_path / "store") as url, httpx.Client(base_url=url, timeout=10) as client:
        status = wait_for(lambda: (s := health(url))["challenger_refused"] and s, message="the challenger refused")
        assert status["challenger_version"] is None and "does not load as a model" in status["challenger_refused"]["9"]
        assert {post_png(client, png)["arm"] for png in PNGS[:10]} == {"production"}
