"""Guards on feedback: the bearer token (401/202) and the per-client rate limit (429 with Retry-After) on a real
`mnist-dagster serve` on 127.0.0.1; and feedback -> landing holding back poisoning: a client labelling 2,000
sevens as ones over HTTP is quarantined (none of its labels lands, Slack hears who and how many) while the
honest clients' labels land; a client with too large a share of a batch is quarantined too."""

import io
import uuid
from pathlib import Path

import dagster as dg
import httpx
import numpy as np
import pytest

from mnist_dagster.assets.monitoring_assets import FeedbackLandingConfig
from mnist_dagster.definitions import build_defs
from mnist_dagster.layout import LANDING_PREFIX, QUARANTINE_PREFIX
from mnist_dagster.lifecycle import deploy
from mnist_dagster.lifecycle.landing import GuardRules, Label, land_feedback, select
from mnist_dagster.sensors.ml_sensors import slack_on_feedback_quarantine
from mnist_dagster.serving.feedback import FeedbackLog, FeedbackRecord, read_feedback
from mnist_dagster.serving.guards import PAGE_SENDS_TOKEN_ENV, TOKEN_ENV, GuardSettings, RateLimiter
from mnist_dagster.serving.prediction_log import PredictionLog, PredictionRecord
from mnist_dagster.storage import LocalStore
from mnist_dagster_tests.serving_support import generated_model, running_server
from mnist_dagster_tests.support import generated_digits, wait_for

TOKEN = "test-feedback-token-" + "x" * 24


@pytest.fixture
def store_dir(tmp_path) -> Path:
    deploy.make_production(LocalStore(tmp_path / "store"), generated_model("1"), "test")
    return tmp_path / "store"


def predict(client: httpx.Client, images: np.ndarray, key: str | None = None) -> list[dict]:
    """Answers for `images` through /predict/batch (250 a request), as client `key`."""
    headers = {"X-Client-Key": key} if key else {}
    answers: list[dict] = []
    for start in range(0, len(images), 250):
        items = [{"pixels": image.tolist()} for image in images[start : start + 250]]
        response = client.post("/predict/batch", json={"images": items}, headers=headers)
        assert response.status_code == 200, response.text
        answers += response.json()["predictions"]
    return answers


def post_label(client: httpx.Client, prediction_id: str, label: int, **headers: str) -> httpx.Response:
    return client.post("/feedback", json={"prediction_id": prediction_id, "label": int(label)}, headers=headers)


def server_logs(store_dir: Path) -> str:
    return "".join(path.read_text() for path in store_dir.parent.glob("server-*.log"))


# ----- the token ----------------------------------------------------------------------------------------


def test_with_a_token_set_feedback_without_it_or_with_a_wrong_one_gets_401(store_dir, monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    monkeypatch.delenv(PAGE_SENDS_TOKEN_ENV, raising=False)
    with running_server(store_dir) as url, httpx.Client(base_url=url, timeout=10) as client:
        [answer] = predict(client, generated_digits(1, seed=5)[0])
        pid = answer["prediction_id"]
        missing = post_label(client, pid, 3)
        assert missing.status_code == 401 and "bearer token" in missing.json()["detail"]
        assert missing.headers["www-authenticate"].startswith("Bearer")
        for wrong in (f"Bearer {TOKEN[:-1]}", f"Bearer {TOKEN}x", f"Basic {TOKEN}", "Bearer", TOKEN):
            refused = post_label(client, pid, 3, Authorization=wrong)
            assert refused.status_code == 401, wrong
            assert refused.headers["www-authenticate"].startswith("Bearer") and "detail" in refused.json()
        accepted = post_label(client, pid, 3, Authorization=f"Bearer {TOKEN}")
        assert accepted.status_code == 202 and accepted.json()["recorded"] is True
        page = client.get("/").text
        assert 'name="mnist-feedback-auth" content="withheld"' in page and TOKEN not in page
    [line] = read_feedback(LocalStore(store_dir))  # only the accepted one was recorded, with its client
    assert (line["prediction_id"], line["label"], line["client"]) == (pid, 3, "addr:127.0.0.1")
    assert "bearer token required (withheld from the page)" in server_logs(store_dir)
    assert TOKEN not in server_logs(store_dir)


def test_the_page_gets_the_token_only_when_the_operator_allows_it(store_dir, monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    with running_server(store_dir, "--page-sends-feedback-token") as url:
        page = httpx.get(f"{url}/", timeout=10).text
        assert f'<meta name="mnist-feedback-token" content="{TOKEN}">' in page
        assert "mnist-feedback-auth" not in page
    monkeypatch.delenv(TOKEN_ENV)
    with running_server(store_dir) as url:  # no token: the page is served as it is, feedback is open
        page = httpx.get(f"{url}/", timeout=10).text
        assert "mnist-feedback-token" not in page and "mnist-feedback-auth" not in page


def test_a_token_shorter_than_16_characters_is_refused_and_never_shown():
    with pytest.raises(ValueError, match="at least 16"):
        GuardSettings.from_env({TOKEN_ENV: "short"})
    settings = GuardSettings.from_env({TOKEN_ENV: TOKEN, PAGE_SENDS_TOKEN_ENV: "1"})
    assert settings.token == TOKEN and settings.page_sends_token
    assert TOKEN not in repr(settings) and TOKEN not in settings.describe()
    assert GuardSettings.from_env({TOKEN_ENV: "  "}).token is None  # empty: no token


# ----- the rate limit ---------------------------------------------------------------------------------


def test_past_the_rate_limit_a_client_gets_429_with_retry_after_and_others_are_not_held_back(store_dir, monkeypatch):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    args = ("--feedback-rate-per-minute", "0.1", "--feedback-burst", "3")  # 3 at once, then one per 10 minutes
    with running_server(store_dir, *args) as url, httpx.Client(base_url=url, timeout=10) as client:
        answers = predict(client, generated_digits(12, seed=6)[0])
        statuses = [post_label(client, a["prediction_id"], 1, **{"X-Client-Key": "busy"}) for a in answers[:4]]
        assert [r.status_code for r in statuses] == [202, 202, 202, 429]
        limited = statuses[-1]
        assert 1 <= int(limited.headers["retry-after"]) <= 600 and "too many feedback posts" in limited.json()["detail"]
        calm = [post_label(client, a["prediction_id"], 2, **{"X-Client-Key": "calm"}) for a in answers[4:7]]
        assert [r.status_code for r in calm] == [202, 202, 202]  # a bucket per client
        by_address = [post_label(client, a["prediction_id"], 3).status_code for a in answers[7:11]]
        assert by_address == [202, 202, 202, 429]  # no key: the peer address is the client
    clients = [line["client"] for line in read_feedback(LocalStore(store_dir))]
    assert sorted(clients) == ["addr:127.0.0.1"] * 3 + ["key:busy"] * 3 + ["key:calm"] * 3


def test_the_token_bucket_refills_at_the_rate_and_tells_how_long_to_wait():
    now = [1000.0]
    limiter = RateLimiter(per_minute=30, burst=2, clock=lambda: now[0])  # one post every 2 s
    assert [limiter.acquire("a"), limiter.acquire("a"), limiter.acquire("a")] == [0, 0, 2]
    now[0] += 1.0
    assert limiter.acquire("a") == 1  # half a post refilled: one more second
    now[0] += 1.0
    assert limiter.acquire("a") == 0 and limiter.acquire("a") == 2
    assert limiter.acquire("b") == 0  # another client's own bucket
    now[0] += 3600
    assert limiter.acquire("a") == 0 and limiter.acquire("a") == 0 and limiter.acquire("a") == 2  # burst caps it


def test_the_limiter_forgets_refilled_buckets_past_its_client_cap():
    now = [0.0]
    limiter = RateLimiter(per_minute=60, burst=1, clock=lambda: now[0], max_clients=100)
    for index in range(100):
        limiter.acquire(f"old-{index}")
    now[0] += 5  # every old bucket has refilled
    limiter.acquire("new")
    assert limiter.acquire("new") >= 1  # a bucket still in use is kept ...
    assert len(limiter) == 1  # ... the refilled ones were dropped


# ----- poisoning ----------------------------------------------------------------------------------------

HONEST_COUNTS = {"honest-a": 240, "honest-b": 150, "honest-c": 95, "honest-d": 60, "honest-e": 40, "honest-f": 31}
HONEST_COUNTS["honest-g"] = 12  # fewer than min_labels: lands untested


def read_npz(store, key: str) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(store.read_bytes(key)), allow_pickle=False) as npz:
        return {name: npz[name] for name in npz.files}


def batches(store, prefix: str) -> list[str]:
    return [item.key for item in store.list(prefix) if item.key.endswith(".npz")]


def test_a_client_labelling_2000_sevens_as_ones_is_quarantined_and_honest_labels_land(
    dev_env, dev_test_resources, instance, slack_to_stub
):
    store_dir = Path(dev_env["MNIST_DATA_DIR"])
    store = dev_test_resources["storage"].open()
    deploy.make_production(store, generated_model("1"), "test")
    images, labels = generated_digits(20_000, seed=77)
    sevens = images[labels == 7][:2000]
    honest: dict[str, int] = {}  # prediction id -> the label sent: the true digit, but people err (3% here)
    slips = np.random.default_rng(78)
    with (
        running_server(store_dir, "--log-flush-seconds", "0.2") as url,
        httpx.Client(base_url=url, timeout=30) as client,
    ):
        poisoned = [a["prediction_id"] for a in predict(client, sevens, "poisoner")]
        assert len(poisoned) == 2000
        for pid in poisoned:
            assert post_label(client, pid, 1, **{"X-Client-Key": "poisoner"}).status_code == 202
        for seed, (name, count) in enumerate(HONEST_COUNTS.items(), start=100):
            own_images, truth = generated_digits(count, seed=seed)
            for answer, digit in zip(predict(client, own_images, name), truth):
                sent = int(digit) if slips.random() > 0.03 else (int(digit) + 1) % 10
                assert post_label(client, answer["prediction_id"], sent, **{"X-Client-Key": name}).status_code == 202
                honest[answer["prediction_id"]] = sent
    # the server has stopped: its logs are flushed
    assert {line["client"] for line in read_feedback(store)} == {"key:poisoner"} | {f"key:{n}" for n in HONEST_COUNTS}

    slack, stub = slack_to_stub
    context = dg.build_sensor_context(instance=instance, resources={"slack": slack})
    cursor = slack_on_feedback_quarantine(context).cursor  # watching from now on
    job = build_defs("dev", dev_env).resolve_job_def("feedback_to_landing_job")
    run_config = {"ops": {"land_feedback": {"config": {"min_feedback": 100}}}}
    result = job.execute_in_process(run_config=run_config, instance=instance)
    assert result.success

    [landed_key] = batches(store, LANDING_PREFIX)
    landed = read_npz(store, landed_key)
    assert dict(zip(landed["prediction_ids"].tolist(), landed["labels"].tolist())) == honest  # every honest label
    [quarantine_key] = batches(store, QUARANTINE_PREFIX)
    held = read_npz(store, quarantine_key)
    assert sorted(held["prediction_ids"].tolist()) == sorted(poisoned)  # none of the 2,000 landed
    assert set(held["labels"].tolist()) == {1} and set(held["clients"].tolist()) == {"key:poisoner"}
    assert set(held["reasons"].tolist()) == {"disagreement"}  # 8 clients: the share rule is not judged yet

    [materialization] = result.asset_materializations_for_node("land_feedback")
    metadata = {key: value.value for key, value in materialization.metadata.items()}
    assert materialization.asset_key == dg.AssetKey("feedback_quarantine")
    assert (metadata["quarantined"], metadata["landed"]) == (2000, len(honest))
    assert metadata["quarantine_key"] == quarantine_key
    [who] = metadata["quarantined_clients"]
    assert (who["client"], who["labels"], who["verdict"]) == ("key:poisoner", 2000, "disagreement")
    assert who["p_value"] < 0.001 / len(HONEST_COUNTS) and who["disagreement"] > 0.9 and who["others"] < 0.1
    assert "Fisher exact" in metadata["test"] and "p < 0.001/k (Bonferroni" in metadata["rule"]

    posted = slack_on_feedback_quarantine(
        dg.build_sensor_context(instance=instance, resources={"slack": slack}, cursor=cursor)
    )
    assert "Posted 1 alert" in posted.skip_reason.skip_message
    [message] = stub.delivered
    assert "2000 label(s) from 1 client(s)" in message["text"] and "`key:poisoner`: 2000 label(s)" in message["text"]
    assert "Fisher exact" in message["text"]


@pytest.fixture
def store(tmp_path):
    return LocalStore(tmp_path / "store")


def log_labelled_traffic(store, clients: dict[str, int], seed: int) -> dict[str, str]:
    """Honest traffic through the real log writers: each client's predictions (right) and true labels; id -> client."""
    prediction_log, feedback_log = PredictionLog(store), FeedbackLog(store)
    owner: dict[str, str] = {}
    for offset, (client, count) in enumerate(clients.items()):
        images, truth = generated_digits(count, seed=seed + offset)
        for image, digit in zip(images, truth):
            pid = uuid.uuid4().hex
            pixels = image.astype(np.float32) / 255
            prediction_log.record(PredictionRecord(0, pid, "production", "1", int(digit), 0.9, "predict", pixels))
            feedback_log.record(FeedbackRecord(0, pid, int(digit), "production", "1", client))
            owner[pid] = client
    prediction_log.flush()
    feedback_log.flush()
    return owner


def test_a_client_sending_too_large_a_share_of_a_batch_is_quarantined(store):
    clients = {"key:big": 400, **{f"key:small-{index}": 40 for index in range(11)}}  # 12 clients; big: 48%
    owner = log_labelled_traffic(store, clients, seed=300)
    result = land_feedback(store, min_feedback=100)
    assert (result.landed, result.quarantined, result.held) == (440, 400, 0)
    quarantined = read_npz(store, result.quarantine_key)
    assert {owner[pid] for pid in quarantined["prediction_ids"].tolist()} == {"key:big"}
    assert set(quarantined["reasons"].tolist()) == {"share"}
    landed = read_npz(store, result.key)
    assert {owner[pid] for pid in landed["prediction_ids"].tolist()} == {f"key:small-{i}" for i in range(11)}
    assert land_feedback(store, min_feedback=1).pending == 0  # quarantined labels are handled: not judged again


# ----- the selection rules, without a store -------------------------------------------------------------


def labels_of(client: str, count: int, disagreement: float, rng: np.random.Generator) -> list[Label]:
    """`count` labels from `client`, each disagreeing with the model with probability `disagreement`."""
    wrong = rng.random(count) < disagreement
    return [Label(uuid.uuid4().hex, 1 if bad else 7, client, 7) for bad in wrong]


def test_two_poisoners_do_not_hide_each_other():
    rng = np.random.default_rng(5)
    honest = [x for i, n in enumerate((200, 120, 80, 60, 40)) for x in labels_of(f"h{i}", n, 0.03, rng)]
    batch = honest + labels_of("p1", 300, 0.9, rng) + labels_of("p2", 300, 0.9, rng)
    selection = select(batch)  # p1 against p2 + honest: 0.9 vs ~0.34 -> the worst first, then the other
    assert {v.client for v in selection.quarantined_clients()} == {"p1", "p2"}
    assert len(selection.land) == len(honest) and selection.level == pytest.approx(0.001 / 7)


def test_honest_clients_with_ordinary_differences_all_land():
    rng = np.random.default_rng(6)
    batch = [x for i, (n, rate) in enumerate([(300, 0.02), (150, 0.05), (90, 0.08), (40, 0.0), (35, 0.1)])
             for x in labels_of(f"h{i}", n, rate, rng)]  # fmt: skip
    selection = select(batch)
    assert selection.quarantined_clients() == [] and len(selection.land) == len(batch)


def test_a_client_that_cannot_be_compared_yet_is_held_and_small_clients_land_untested():
    rng = np.random.default_rng(7)
    alone = labels_of("only", 100, 0.9, rng)
    held = select(alone + labels_of("tiny", 10, 0.0, rng))  # 10 peer labels: too few to judge "only" against
    assert [v.reason for v in held.verdicts] == ["held", None] and len(held.held) == 100 and len(held.land) == 10
    untested = select(alone, GuardRules(min_peer_labels=0))  # a deployment with one client: it lands
    assert len(untested.land) == 100 and untested.quarantined_clients() == []


def test_the_ops_config_defaults_are_the_rules_defaults():
    assert GuardRules(**FeedbackLandingConfig().rule_values()) == GuardRules()


@pytest.mark.slow  # drives a browser, as test_page_e2e.py does
def test_the_page_hides_feedback_without_the_token_and_sends_it_where_allowed(store_dir, monkeypatch):
    # Here, not at the top: the browser is optional, and test_page_e2e.py imports playwright itself.
    sync_api = pytest.importorskip("playwright.sync_api")
    from mnist_dagster_tests.test_page_e2e import CHROMIUM, CHROMIUM_FLAGS, draw_a_seven

    if not CHROMIUM.exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium, or set CHROMIUM_PATH)")
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 900, "height": 900})
        page.set_default_timeout(30_000)
        with running_server(store_dir) as url:  # the token is withheld from the page
            page.goto(url)
            draw_a_seven(page)
            sync_api.expect(page.locator("#result")).to_be_visible()
            sync_api.expect(page.locator("#feedback-title")).to_contain_text("Feedback needs a token")
            sync_api.expect(page.get_by_role("button", name="It was 7")).to_be_hidden()
        with running_server(store_dir, "--log-flush-seconds", "0.2", "--page-sends-feedback-token") as url:
            page.goto(url)
            draw_a_seven(page)
            sync_api.expect(page.locator("#result")).to_be_visible()  # answered: the id is the new one
            prediction_id = page.locator("#result").get_attribute("data-prediction-id")
            page.get_by_role("button", name="It was 7").click()
            sync_api.expect(page.locator("#status")).to_contain_text("recorded 7")
            key = page.evaluate("localStorage.getItem('mnist-client-key')")
            lines = wait_for(
                lambda: [x for x in read_feedback(LocalStore(store_dir)) if x["prediction_id"] == prediction_id],
                message="the page's feedback line",
            )
        browser.close()
    assert [(x["label"], x["client"]) for x in lines] == [(7, f"key:{key}")]  # the browser's own key
