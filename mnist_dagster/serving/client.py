"""A small standard-library client for a running `mnist-dagster serve`: what `digit_predictions` uses
to check over HTTP that the server picked up the model it just published."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Any


class ServingCheckError(RuntimeError):
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
    """Poll `/health` until the server serves `version`; raises `ServingCheckError` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last: dict[str, Any] | str = "no answer yet"
    while True:
        try:
            last = health(url)
            if last.get("model_version") == version:
                return last
            if version in (last.get("refused") or {}):
                raise ServingCheckError(f"{url} refused model version {version}: {last['refused'][version]}")
        except (OSError, ValueError) as error:
            last = f"{type(error).__name__}: {error}"
        if time.monotonic() >= deadline:
            raise ServingCheckError(
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
        raise ServingCheckError(f"{url}/predict answered {error.code}: {error.read()[:500]!r}") from error
