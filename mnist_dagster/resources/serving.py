"""Where the real-time endpoint runs, if anywhere (`MNIST_SERVING_URL`), and the check that it follows the record.

`digit_predictions` uses both: when a server is configured, `check_live_server` confirms over HTTP (the standard
library's client, no dependency) that it serves the version just published and answers what the model answers.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

import dagster as dg
import numpy as np

from mnist_dagster.scoring.preprocess import encode_png


class ServingEndpoint(dg.ConfigurableResource):
    """A running `mnist-dagster serve` that must pick up each published model (checked over HTTP).

    Empty means no server to check: the model is published to the store, and servers pick it up.
    """

    url: str = ""

    @property
    def configured(self) -> bool:
        return bool(self.url.strip())


class LiveServerError(RuntimeError):
    """The running server did not serve what was published, or answered wrongly."""


def health(url: str, timeout: float = 5.0) -> dict[str, Any]:
    """`GET /health` as a dict (its 503 body too); raises `OSError` when the server cannot be reached."""
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as error:
        if error.code == 503:
            return json.loads(error.read())
        raise


def wait_for_version(url: str, version: str, timeout: float, interval: float = 0.5) -> dict[str, Any]:
    """Poll `/health` until the server serves `version`; raises `LiveServerError` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last: dict[str, Any] | str = "no answer yet"
    while True:
        try:
            last = health(url)
            if last.get("model_version") == version:
                return last
            if version in (last.get("refused") or {}):
                raise LiveServerError(f"{url} refused model version {version}: {last['refused'][version]}")
        except (OSError, ValueError) as error:
            last = f"{type(error).__name__}: {error}"
        if time.monotonic() >= deadline:
            raise LiveServerError(
                f"{url} did not serve model version {version} within {timeout:g} s (last /health: {last}); "
                "is it reading the store this deployment publishes to (mnist-dagster serve --store)?"
            )
        time.sleep(interval)


def predict_png(url: str, png: bytes, timeout: float = 10.0) -> dict[str, Any]:
    request = urllib.request.Request(
        f"{url.rstrip('/')}/predict", data=png, headers={"Content-Type": "image/png"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as error:
        raise LiveServerError(f"{url}/predict answered {error.code}: {error.read()[:500]!r}") from error


@dataclass(frozen=True)
class LiveCheck:
    url: str
    images: int
    latencies: list[float]


def check_live_server(url: str, version: str, images: np.ndarray, expected: np.ndarray, timeout: float) -> LiveCheck:
    """The running server at `url` serves `version` within `timeout` seconds and answers `expected` digits."""
    wait_for_version(url, version, timeout)
    latencies, mismatches = [], []
    for index, image in enumerate(images):
        started = time.perf_counter()
        answer = predict_png(url, encode_png(image))
        latencies.append(time.perf_counter() - started)
        if answer["model_version"] != version or answer["digit"] != int(expected[index]):
            mismatches.append(f"image {index}: got {answer['digit']} from version {answer['model_version']}")
    if mismatches:
        raise LiveServerError(f"{url} answers differently from the published model: {'; '.join(mismatches[:5])}")
    return LiveCheck(url, len(images), latencies)
