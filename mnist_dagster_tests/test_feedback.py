"""`POST /feedback` on a real `mnist-dagster serve`: true labels for the predictions it issued, journaled before
the 202 and shipped to `feedback/`, none lost under load; and the JSON-lines writer both logs share."""

import json
import threading
from pathlib import Path

import httpx
import pytest

from mnist_dagster.lifecycle import deploy
from mnist_dagster.serving.feedback import FeedbackLog, FeedbackRecord, read_feedback
from mnist_dagster.storage import LocalStore
from mnist_dagster.storage.jsonl import read_json_lines
from mnist_dagster_tests.serving_support import generated_model, running_server
from mnist_dagster_tests.support import generated_digits, wait_for

FEEDBACK_KEYS = {"time", "prediction_id", "label", "arm", "model_version"}  # as stored
READ_KEYS = FEEDBACK_KEYS | {"repeat"}  # as `read_feedback` gives them


@pytest.fixture
def store_dir(tmp_path) -> Path:
    deploy.make_production(LocalStore(tmp_path / "store"), generated_model("1"), "test")
    return tmp_path / "store"


def issue_predictions(client: httpx.Client, count: int) -> list[dict]:
    """`count` predictions through /predict/batch (250 a request): ids the server will accept feedback for."""
    images, _ = generated_digits(250, seed=4)
    answers = []
    while len(answers) < count:
        items = [{"pixels": image.tolist()} for image in images[: count - len(answers)]]
        response = client.post("/predict/batch", json={"images": items})
        assert response.status_code == 200, response.text
        answers += response.json()["predictions"]
    return answers


def post_feedback(client: httpx.Client, body, content_type: str = "application/json") -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return client.post("/feedback", content=content, headers={"Content-Type": content_type})


def test_feedback_is_recorded_with_the_arm_and_version_and_bad_feedback_is_refused(store_dir):
    store = LocalStore(store_dir)
    with (
        running_server(store_dir, "--log-flush-seconds", "0.2") as url,
        httpx.Client(base_url=url, timeout=10) as client,
    ):
        answer = client.post("/predict", json={"pixels": generated_digits(1, seed=9)[0][0].tolist()}).json()
        prediction_id = answer["prediction_id"]
        accepted = post_feedback(client, {"prediction_id": prediction_id, "label": 7})
        assert accepted.status_code == 202
        assert accepted.json() == {"prediction_id": prediction_id, "label": 7, "recorded": True}
        lines = wait_for(lambda: read_feedback(store), message="the feedback line")
        assert len(lines) == 1 and set(lines[0]) == READ_KEYS | {"client"}
        assert {k: v for k, v in lines[0].items() if k != "time"} == {
            "prediction_id": prediction_id, "label": 7, "arm": "production", "model_version": "1", "repeat": False,
            "client": "addr:127.0.0.1",
        }  # fmt: skip
        assert lines[0]["time"].endswith("+00:00")

        refused = [
            ({"prediction_id": "0" * 32, "label": 3}, 404, "unknown prediction_id"),
            ({"prediction_id": prediction_id, "label": 10}, 422, "digit 0-9"),
            ({"prediction_id": prediction_id, "label": -1}, 422, "digit 0-9"),
            ({"prediction_id": prediction_id, "label": "7"}, 422, "digit 0-9"),
            ({"prediction_id": prediction_id, "label": 7.0}, 422, "digit 0-9"),
            ({"prediction_id": prediction_id, "label": True}, 422, "digit 0-9"),
            ({"prediction_id": prediction_id}, 422, "missing field(s) ['label']"),
            ({"label": 7}, 422, "missing field(s) ['prediction_id']"),
            ({"prediction_id": 12, "label": 7}, 422, "'prediction_id' must be"),
            ({"prediction_id": prediction_id, "label": 7, "note": "x"}, 422, "unknown field"),
            ([prediction_id, 7], 422, "must be an object"),
            (b'{"prediction_id": ', 400, "not valid JSON"),
            (b"", 400, "empty body"),
        ]
        for body, status, phrase in refused:
            response = post_feedback(client, body)
            assert (response.status_code, body) == (status, body)
            assert phrase in response.json()["detail"], (body, response.json())
        wrong_type = post_feedback(client, {"prediction_id": prediction_id, "label": 7}, "text/plain")
        assert wrong_type.status_code == 415 and "application/json" in wrong_type.json()["detail"]
    assert len(read_feedback(store)) == 1  # nothing refused was recorded


def test_2000_feedback_posts_from_8_threads_are_all_in_the_store(store_dir):
    store = LocalStore(store_dir)
    with running_server(store_dir, "--log-flush-seconds", "0.2") as url:
        with httpx.Client(base_url=url, timeout=30) as client:
            answers = issue_predictions(client, 2000)
        labels = {answer["prediction_id"]: index % 10 for index, answer in enumerate(answers)}
        ids = list(labels)
        failures: list[str] = []

        def send(part: list[str]) -> None:
            with httpx.Client(base_url=url, timeout=30) as client:
                for prediction_id in part:
                    response = post_feedback(client, {"prediction_id": prediction_id, "label": labels[prediction_id]})
                    if response.status_code != 202:
                        failures.append(f"{response.status_code} {response.text}")

        threads = [threading.Thread(target=send, args=(ids[i::8],)) for i in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert failures == []
    lines = read_feedback(store)  # the server has stopped: its last flush is in
    assert len(lines) == 2000
    assert {line["prediction_id"]: line["label"] for line in lines} == labels
    assert {(line["arm"], line["model_version"]) for line in lines} == {("production", "1")}


class FlakyStore(LocalStore):
    """A store that refuses every write while `down` is set."""

    down = False

    def write_bytes(self, key: str, data: bytes) -> None:
        if self.down:
            raise OSError("store unreachable")
        super().write_bytes(key, data)


def test_a_log_without_a_server_keeps_its_lines_on_disk_through_a_store_outage(tmp_path):
    """A log written directly (scripts, tests) journals to a private folder; `flush` ships it, and a refused
    upload leaves every line on disk for the next try rather than dropping any."""
    store = FlakyStore(tmp_path / "store")
    log = FeedbackLog(store)
    store.down = True
    for index in range(8):
        assert log.record(FeedbackRecord(1_700_000_000.0 + index, f"id-{index}", index % 10, "production", "1"))
    with pytest.raises(OSError, match="refused"):
        log.flush()
    assert read_json_lines(store, "feedback") == []
    store.down = False
    log.flush()
    lines = read_json_lines(store, "feedback")
    assert [line["prediction_id"] for line in lines] == [f"id-{index}" for index in range(8)]
    assert lines[0]["time"] == "2023-11-14T22:13:20.000000+00:00" and set(lines[0]) == FEEDBACK_KEYS
