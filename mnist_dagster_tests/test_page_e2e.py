"""The draw-a-digit page (`GET /`) in headless Chromium against a real `mnist-dagster serve`: draw a stroke
with the mouse, read the prediction (digit, ten bars, version and arm), send the true label, and find it in
the feedback log with the prediction's id.

Regenerate the README screenshot from a passing run:
    MNIST_UI_SCREENSHOTS=docs/images pytest mnist_dagster_tests/test_page_e2e.py
"""

import io
import os
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Page, expect, sync_playwright

from mnist_dagster.ml.data import MNIST_FILES
from mnist_dagster.lifecycle import deploy
from mnist_dagster.serving.feedback import read_feedback
from mnist_dagster.storage import LocalStore
from mnist_dagster_tests.serving_support import generated_model, real_model, running_server
from mnist_dagster_tests.support import REAL_MNIST_DIR, wait_for

pytestmark = pytest.mark.slow  # drives a browser (a few seconds)

CHROMIUM = Path(os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium"))
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]  # fmt: skip
SCREENSHOT = "draw-a-digit.png"


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[tuple[str, LocalStore, str]]:
    """(url, store, model version): the real-data model where the MNIST files are here (so a drawn 7 reads
    as 7 in the screenshot), else the generated-digits one; the page only needs some model."""
    has_mnist = all((REAL_MNIST_DIR / name).is_file() for name in MNIST_FILES)
    model = real_model(REAL_MNIST_DIR) if has_mnist else generated_model()
    store_dir = tmp_path_factory.mktemp("page") / "store"
    deploy.make_production(LocalStore(store_dir), model, "test")
    with running_server(store_dir, "--log-flush-seconds", "0.2") as url:
        yield url, LocalStore(store_dir), model.version


@pytest.fixture
def page() -> Iterator[Page]:
    if not CHROMIUM.exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium, or set CHROMIUM_PATH)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 900, "height": 900})
        page.set_default_timeout(30_000)
        yield page
        browser.close()


def draw_a_seven(page: Page) -> None:
    """One stroke with the mouse, as a person draws a 7: across the top, then down to the left."""
    box = page.locator("#pad").bounding_box()
    x, y, w, h = box["x"], box["y"], box["width"], box["height"]
    page.mouse.move(x + 0.25 * w, y + 0.2 * h)
    page.mouse.down()
    page.mouse.move(x + 0.75 * w, y + 0.2 * h, steps=12)
    page.mouse.move(x + 0.42 * w, y + 0.85 * h, steps=16)
    page.mouse.up()


def test_draw_predict_and_correct_a_digit_in_the_browser(served, page, tmp_path):
    url, store, version = served
    page.goto(url)
    expect(page).to_have_title(re.compile("Draw a digit"))
    draw_a_seven(page)  # predicted when the stroke ends

    result = page.locator("#result")
    expect(result).to_be_visible()
    expect(page.locator("#bars li")).to_have_count(10)
    expect(page.locator("#version")).to_have_text(version)
    expect(page.locator("#arm")).to_have_text("production")
    digit = page.locator("#digit").inner_text()
    assert digit in "0123456789" and len(digit) == 1
    prediction_id = result.get_attribute("data-prediction-id")
    assert prediction_id and len(prediction_id) == 32
    keep_screenshot(page, tmp_path)

    page.get_by_role("button", name="It was 7").click()
    expect(page.locator("#status")).to_contain_text("recorded 7")
    expect(page.get_by_role("button", name="It was 3")).to_be_disabled()  # one label per prediction
    lines = wait_for(
        lambda: [l for l in read_feedback(store) if l["prediction_id"] == prediction_id], message="feedback"
    )
    assert [(l["label"], l["arm"], l["model_version"]) for l in lines] == [(7, "production", version)]

    page.get_by_role("button", name="Clear").click()
    expect(result).to_be_hidden()
    page.get_by_role("button", name="Predict").focus()  # keyboard only: Predict on an empty pad says why not
    page.keyboard.press("Enter")
    expect(page.locator("#status")).to_have_text("Draw a digit first.")


def keep_screenshot(page: Page, tmp_path: Path) -> None:
    """Into the test's folder always; into MNIST_UI_SCREENSHOTS (the README's docs/images) when set, as a
    256-colour PNG (nothing visible is lost and the file shrinks several-fold)."""
    from PIL import Image

    png = page.locator("main").screenshot()
    folders = [tmp_path] + (
        [Path(os.environ["MNIST_UI_SCREENSHOTS"])] if os.environ.get("MNIST_UI_SCREENSHOTS") else []
    )
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
        Image.open(io.BytesIO(png)).convert("RGB").quantize(colors=256).save(folder / SCREENSHOT, optimize=True)


def test_the_page_is_served_from_the_package_and_needs_nothing_else(served):
    url = served[0]
    with httpx.Client(base_url=url, timeout=10) as client:
        index = client.get("/")
        assert index.status_code == 200 and index.headers["content-type"].startswith("text/html")
        assets = re.findall(r'(?:src|href)="(/static/[^"]+)"', index.text)
        assert sorted(assets) == ["/static/app.js", "/static/style.css"]
        bodies = [index.text]
        for path, media_type in zip(sorted(assets), ["text/javascript", "text/css"]):
            response = client.get(path)
            assert response.status_code == 200 and response.headers["content-type"].startswith(media_type)
            bodies.append(response.text)
        assert not any(re.search(r"https?://", body) for body in bodies)  # no CDN: works offline
        missing = client.get("/static/../pyproject.toml")
        assert missing.status_code == 404 and "detail" in missing.json()
        assert client.get("/static/nothing.js").json() == {"detail": "no such file: 'nothing.js'"}
        assert "/" not in client.get("/openapi.json").json()["paths"]  # a page, not part of the API
